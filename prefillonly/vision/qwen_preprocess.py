"""Image preprocessing for Qwen2-VL, Qwen2.5-VL and Qwen3-VL, bit-exact with transformers.

This reimplements transformers 5's ``Qwen2VLImageProcessorPil`` (which
AutoImageProcessor also picks for Qwen2.5-VL and Qwen3-VL with the PIL
backend) without torchvision: ``smart_resize`` to a multiple of
``patch_size * merge_size``, PIL bicubic resize, rescale, normalise, repeat the
single frame ``temporal_patch_size`` times and flatten patches in HF's order
``(grid_h/m, grid_w/m, m, m, C, T, P, P)``.  The vision tower and the M-RoPE
positions depend on that exact order, so tests compare against transformers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from prefillonly.errors import ImageError
from prefillonly.vision.config_io import read_image_processor_config
from prefillonly.vision.image_io import rgb_pixels, to_rgb
from prefillonly.vision.pixel_norm import normalization_lut

__all__ = [
    "smart_resize", "QwenImageInput", "QwenPixels", "QwenImagePreprocessor", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MAX_ASPECT_RATIO = 200
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # a float dtype's bits, by item size


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
    *,
    field: str = "image",
) -> tuple[int, int]:
    """Return ``(height, width)`` divisible by ``factor`` with area in ``[min_pixels, max_pixels]``.

    Same arithmetic as transformers' ``smart_resize`` (including Python's
    round-half-to-even and its float rounding), so grids match exactly.
    transformers raises ``ValueError`` for an aspect ratio above 200; we raise
    :class:`ImageError` there, and also for a zero-sized image.
    """
    if height <= 0 or width <= 0:
        raise ImageError(field, f"image has zero size ({width}x{height} pixels)")
    if max(height, width) / min(height, width) > _MAX_ASPECT_RATIO:
        raise ImageError(
            field,
            f"absolute aspect ratio must be smaller than {_MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)} ({width}x{height} pixels); crop or pad the image",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class QwenImageInput:
    """One preprocessed image: what the vision tower and the prompt builder need."""

    pixel_values: torch.Tensor  # (num_patches, C * T * P * P), float32 unless asked otherwise
    grid_thw: tuple[int, int, int]  # (t, h, w) in patches
    num_tokens: int  # number of <|image_pad|> tokens: t * h * w // merge_size**2


@dataclass(frozen=True)
class QwenPixels:
    """One resized image as uint8 RGB, patchified where it is used (:meth:`patchify`).

    For a GPU tower this is what the worker threads hand over: the copy carries
    a quarter of the patches' bytes (one byte per subpixel, against two per
    subpixel and frame in half precision), and the reordering and normalising
    run on the GPU instead of the CPU, where they were most of an image's work.
    """

    pixels: torch.Tensor  # (H, W, 3) uint8, H and W multiples of the patch size
    grid_thw: tuple[int, int, int]
    num_tokens: int
    dtype: torch.dtype  # of the patches
    processor: QwenImagePreprocessor

    def patchify(self) -> QwenImageInput:
        """The patches on the pixels' device: exactly what the processor's CPU path gives."""
        values = self.processor.patchify_tensor(self.pixels, self.dtype)
        return QwenImageInput(pixel_values=values, grid_thw=self.grid_thw, num_tokens=self.num_tokens)


class QwenImagePreprocessor:
    """Qwen-VL image processor (PIL backend semantics of transformers 5)."""

    def __init__(
        self,
        *,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: float | Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: float | Sequence[float] = OPENAI_CLIP_STD,
        do_resize: bool = True,
        resample: int = Image.Resampling.BICUBIC,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
    ) -> None:
        if not min_pixels or not max_pixels:
            raise ValueError(f"min_pixels and max_pixels must be positive, got {min_pixels}, {max_pixels}")
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.patch_size = int(patch_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.merge_size = int(merge_size)
        self.do_resize = bool(do_resize)
        self.resample = Image.Resampling(int(resample))
        self._lut = normalization_lut(
            3,
            do_rescale=do_rescale,
            rescale_factor=rescale_factor,
            do_normalize=do_normalize,
            mean=image_mean,
            std=image_std,
        )
        self._tables: dict[torch.dtype, np.ndarray] = {}
        self._device_tables: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (one merged token covers factor x factor pixels)."""
        return self.patch_size * self.merge_size

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> QwenImagePreprocessor:
        """Build from a ``preprocessor_config.json`` dict, resolving sizes as transformers 5 does.

        ``size: {shortest_edge, longest_edge}`` (Qwen3-VL) gives min/max pixels;
        top-level ``min_pixels`` / ``max_pixels`` (Qwen2/2.5-VL) override it.  A
        ``size`` that uses ``min_pixels``/``max_pixels`` keys (older configs) is
        also accepted, where transformers 5 would raise.
        """
        size = config.get("size")
        if size is None:
            min_pixels, max_pixels = 56 * 56, 28 * 28 * 1280
        elif isinstance(size, Mapping):
            min_pixels = size.get("shortest_edge", size.get("min_pixels"))
            max_pixels = size.get("longest_edge", size.get("max_pixels"))
        else:
            raise ValueError(f"preprocessor config 'size' must be a dict with shortest_edge/longest_edge, got {size!r}")
        if config.get("min_pixels") is not None:
            min_pixels = config["min_pixels"]
        if config.get("max_pixels") is not None:
            max_pixels = config["max_pixels"]
        if min_pixels is None or max_pixels is None:
            raise ValueError(f"preprocessor config must give shortest_edge and longest_edge in 'size', got {size!r}")
        kwargs: dict[str, Any] = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        for key in (
            "patch_size",
            "temporal_patch_size",
            "merge_size",
            "image_mean",
            "image_std",
            "do_resize",
            "resample",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
        ):
            if config.get(key) is not None:
                kwargs[key] = config[key]
        if config.get("do_convert_rgb") is False:
            raise ValueError("do_convert_rgb=False is not supported: images are always converted to RGB")
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str]) -> QwenImagePreprocessor:
        """Read ``preprocessor_config.json`` (or the ``image_processor`` part of ``processor_config.json``)."""
        return cls.from_dict(read_image_processor_config(model_dir))

    # ----------------------------------------------------------------- sizes

    def resized_size(self, height: int, width: int, *, field: str = "image") -> tuple[int, int]:
        """Pixel size ``(height, width)`` the image is resized to."""
        if not self.do_resize:
            if height % self.factor or width % self.factor or height <= 0 or width <= 0:
                raise ImageError(
                    field,
                    f"with do_resize=False the image sides must be positive multiples of {self.factor}, "
                    f"got {width}x{height}",
                )
            return height, width
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels, field=field)

    def grid_thw_for_size(self, height: int, width: int, *, field: str = "image") -> tuple[int, int, int]:
        """Patch grid ``(t, h, w)`` of an image of this size, without touching pixels."""
        rh, rw = self.resized_size(height, width, field=field)
        return 1, rh // self.patch_size, rw // self.patch_size

    def num_tokens_for_size(self, height: int, width: int, *, field: str = "image") -> int:
        """Number of ``<|image_pad|>`` tokens for an image of this size (for planning batches)."""
        t, h, w = self.grid_thw_for_size(height, width, field=field)
        return t * h * w // self.merge_size**2

    # ----------------------------------------------------------------- processing

    def __call__(
        self,
        image: Image.Image,
        *,
        field: str = "image",
        dtype: torch.dtype = torch.float32,
        pin_memory: bool = False,
        patchify: bool = True,
    ) -> QwenImageInput | QwenPixels:
        """Preprocess one image (any PIL mode; converted to RGB as transformers does).

        ``dtype`` other than float32 gives exactly the float32 result converted
        to ``dtype`` (every value is one table entry, converted once), which is
        what the tower does first anyway, at a fraction of the memory traffic.
        ``pin_memory`` writes the pixels to page-locked memory, so that their copy
        to the GPU can be asynchronous and never waits for the GPU's queue.
        ``patchify=False`` stops after the resize: :class:`QwenPixels`, patchified
        later on the device they are copied to.
        """
        if not isinstance(image, Image.Image):
            raise ImageError(field, f"expected a PIL image, got {type(image).__name__}; use load_image() first")
        width, height = image.size
        rh, rw = self.resized_size(height, width, field=field)
        image = to_rgb(image)
        if self.do_resize and (rw, rh) != image.size:  # PIL returns a plain copy for the same size
            image = image.resize((rw, rh), resample=self.resample)
        pixels = rgb_pixels(image)  # (H, W, 3) uint8, a view where Pillow allows
        grid_h, grid_w = rh // self.patch_size, rw // self.patch_size
        grid, num_tokens = (1, grid_h, grid_w), grid_h * grid_w // self.merge_size**2
        if not patchify:
            raw = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=pin_memory)
            raw.numpy()[...] = pixels
            return QwenPixels(raw, grid, num_tokens, dtype, self)
        return QwenImageInput(pixel_values=self._patchify(pixels, dtype, pin_memory), grid_thw=grid,
                              num_tokens=num_tokens)

    def _table(self, dtype: torch.dtype) -> np.ndarray:
        """The normalisation table in ``dtype``, as raw bits numpy can gather (numpy has no bfloat16)."""
        table = self._tables.get(dtype)
        if table is None:
            converted = torch.from_numpy(self._lut).to(dtype)
            table = converted.view(_BITS[converted.element_size()]).numpy()
            self._tables[dtype] = table
        return table

    def _patchify(self, pixels: np.ndarray, dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
        """Flatten uint8 HWC pixels into patches in HF's exact order, normalised through the table.

        The patch reordering runs on the uint8 pixels (a quarter of the bytes),
        each channel is gathered through its table contiguously, and one strided
        copy puts channels in place and writes the frame ``temporal_patch_size``
        times, straight into the output tensor.
        """
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        height, width, channels = pixels.shape
        grid_h, grid_w = height // p, width // p
        # (GH, m, P, GW, m, P, C) -> (C, GH, GW, m, m, P, P): HF's patch order, channel first for the gather.
        blocks = pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, channels).transpose(6, 0, 3, 1, 4, 2, 5)
        blocks = np.ascontiguousarray(blocks)
        table = self._table(dtype)
        values = np.empty(blocks.shape, dtype=table.dtype)
        for c in range(channels):  # a contiguous 1-D table lookup per channel: the fastest exact gather
            np.take(table[c], blocks[c], out=values[c], mode="clip")  # uint8 indices never leave [0, 256)
        out = torch.empty((grid_h * grid_w, channels * t * p * p), dtype=dtype, pin_memory=pin_memory)
        dest = out.view(_BITS[out.element_size()]).numpy().reshape(grid_h // m, grid_w // m, m, m, channels, t, p, p)
        # A still image is its own temporal neighbour: the frame goes after C, T times.
        dest[...] = values.transpose(1, 2, 3, 4, 0, 5, 6)[:, :, :, :, :, None]
        return out

    def patchify_tensor(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`_patchify` in torch, on the pixels' device: (H, W, C) uint8 -> (patches, C * T * P * P).

        The same table lookup, so the same values bit for bit; four kernels on a GPU.
        """
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        height, width, channels = pixels.shape
        grid_h, grid_w = height // p, width // p
        table, offsets = self._device_table(dtype, pixels.device)
        blocks = pixels.view(grid_h // m, m, p, grid_w // m, m, p, channels).permute(0, 3, 1, 4, 6, 2, 5)
        index = blocks.to(torch.int32, memory_format=torch.contiguous_format)
        index += offsets  # channel c reads table entries c * 256 + value
        values = table.index_select(0, index.view(-1)).view(index.shape)
        out = torch.empty((grid_h * grid_w, channels * t * p * p), dtype=dtype, device=pixels.device)
        frames = values.unsqueeze(5).expand(-1, -1, -1, -1, -1, t, -1, -1)  # the frame, temporal_patch_size times
        out.view(grid_h // m, grid_w // m, m, m, channels, t, p, p).copy_(frames)
        return out

    def _device_table(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalisation table flattened to (C * 256,) in ``dtype`` on ``device``, and each channel's offset."""
        key = (dtype, device)
        if key not in self._device_tables:
            table = torch.from_numpy(self._lut).to(dtype).reshape(-1).to(device)
            offsets = (torch.arange(self._lut.shape[0], dtype=torch.int32) * self._lut.shape[1]).view(-1, 1, 1)
            self._device_tables[key] = (table, offsets.to(device))
        return self._device_tables[key]
