"""Image preprocessing for LLaVA-NeXT (LLaVA-1.6), bit-exact with transformers 5.

Reimplements ``LlavaNextImageProcessorPil`` ("anyres"): pick the best grid
resolution from ``image_grid_pinpoints``, resize keeping the aspect ratio, pad
with zeros to that resolution, cut it into ``crop_size`` tiles, prepend the
whole image squashed to one tile, then resize / center-crop / rescale /
normalise every tile.  The prompt's ``<image>`` token count follows
``LlavaNextProcessor._get_number_of_features`` (unpadded grid features, one
newline per grid row, the base tile, minus the CLS for the "default" feature
strategy), which is what the model's ``pack_image_features`` produces.
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
from prefillonly.vision.config_io import read_image_processor_config, read_json_config
from prefillonly.vision.image_io import to_rgb
from prefillonly.vision.pixel_norm import apply_lut, normalization_lut
from prefillonly.vision.qwen_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = [
    "select_best_resolution",
    "get_patch_output_size",
    "LlavaNextImageInput",
    "LlavaNextImagePreprocessor",
]

DEFAULT_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def select_best_resolution(
    original_size: Sequence[int], possible_resolutions: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """Pick the ``(height, width)`` pinpoint keeping the most pixels and wasting the fewest (HF's rule)."""
    original_height, original_width = original_size
    best_fit: tuple[int, int] | None = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution
        ):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (height, width)
    if best_fit is None:
        raise ValueError(f"no usable resolution in image_grid_pinpoints {possible_resolutions!r}")
    return best_fit


def get_patch_output_size(original_size: Sequence[int], target_resolution: Sequence[int]) -> tuple[int, int]:
    """Size ``(height, width)`` the image is resized to before padding up to ``target_resolution``."""
    original_height, original_width = original_size
    target_height, target_width = target_resolution
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        new_width = target_width
        new_height = min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height = target_height
        new_width = min(math.ceil(original_width * scale_h), target_width)
    return new_height, new_width


@dataclass(frozen=True)
class LlavaNextImageInput:
    """One preprocessed image for LLaVA-NeXT."""

    pixel_values: torch.Tensor  # (num_patches, 3, crop_h, crop_w) float32; patch 0 is the whole image
    image_size: tuple[int, int]  # original (height, width), needed by the model to unpad
    num_tokens: int  # number of <image> tokens the prompt needs


class LlavaNextImagePreprocessor:
    """LLaVA-NeXT image processor (PIL backend semantics of transformers 5) plus the token count."""

    def __init__(
        self,
        *,
        size: Mapping[str, int] | int = 224,
        crop_size: Mapping[str, int] | int = 224,
        image_grid_pinpoints: Sequence[Sequence[int]] = DEFAULT_GRID_PINPOINTS,
        image_mean: float | Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: float | Sequence[float] = OPENAI_CLIP_STD,
        do_resize: bool = True,
        resample: int = Image.Resampling.BICUBIC,
        do_center_crop: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        vision_patch_size: int = 14,
        vision_feature_select_strategy: str | None = "default",
        num_additional_image_tokens: int = 1,
    ) -> None:
        self.size = _size_dict(size, "size", square=False)
        self.crop_size = _size_dict(crop_size, "crop_size", square=True)
        self.image_grid_pinpoints = [[int(h), int(w)] for h, w in image_grid_pinpoints]
        self.do_resize = bool(do_resize)
        self.resample = Image.Resampling(int(resample))
        self.do_center_crop = bool(do_center_crop)
        self.vision_patch_size = int(vision_patch_size)
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.num_additional_image_tokens = int(num_additional_image_tokens)
        self._lut = normalization_lut(
            3,
            do_rescale=do_rescale,
            rescale_factor=rescale_factor,
            do_normalize=do_normalize,
            mean=image_mean,
            std=image_std,
        )
        # Same choices as HF's _preprocess: base-tile size and the tile (patch) size.
        if "height" in self.size and "width" in self.size:
            self._base_size = (self.size["height"], self.size["width"])
        else:
            self._base_size = (self.size["shortest_edge"], self.size["shortest_edge"])
        if self.crop_size.get("height"):
            self._tile = self.crop_size["height"]
        elif self.size.get("height"):
            self._tile = self.size["height"]
        else:
            self._tile = self.size["shortest_edge"]

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_dict(
        cls, config: Mapping[str, Any], processor_config: Mapping[str, Any] | None = None
    ) -> LlavaNextImagePreprocessor:
        """Build from ``preprocessor_config.json`` (+ optional ``processor_config.json``) dicts.

        ``processor_config`` supplies ``patch_size`` (of the vision tower),
        ``vision_feature_select_strategy`` and ``num_additional_image_tokens``;
        without it the llava-hf v1.6 values (14, "default", 1) are used.
        """
        kwargs: dict[str, Any] = {}
        for key in (
            "size",
            "crop_size",
            "image_grid_pinpoints",
            "image_mean",
            "image_std",
            "do_resize",
            "resample",
            "do_center_crop",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
        ):
            if config.get(key) is not None:
                kwargs[key] = config[key]
        if config.get("do_convert_rgb") is False:
            raise ValueError("do_convert_rgb=False is not supported: images are always converted to RGB")
        if processor_config:
            if processor_config.get("patch_size") is not None:
                kwargs["vision_patch_size"] = processor_config["patch_size"]
            if "vision_feature_select_strategy" in processor_config:
                kwargs["vision_feature_select_strategy"] = processor_config["vision_feature_select_strategy"]
            if processor_config.get("num_additional_image_tokens") is not None:
                kwargs["num_additional_image_tokens"] = processor_config["num_additional_image_tokens"]
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str]) -> LlavaNextImagePreprocessor:
        """Read ``preprocessor_config.json`` and, if present, ``processor_config.json``."""
        config = read_image_processor_config(model_dir)
        proc_path = os.path.join(os.fspath(model_dir), "processor_config.json")
        processor_config = read_json_config(proc_path) if os.path.isfile(proc_path) else None
        return cls.from_dict(config, processor_config)

    # ----------------------------------------------------------------- sizes

    @property
    def output_size(self) -> tuple[int, int]:
        """``(height, width)`` of every output tile."""
        h, w = self._base_size
        if self.do_resize:
            h, w = _resize_target((h, w), self.size)
        if self.do_center_crop:
            h, w = self.crop_size["height"], self.crop_size["width"]
        return h, w

    def num_patches_for_size(self, height: int, width: int) -> int:
        """Number of tiles (incl. the base tile) for an image of this size."""
        best_h, best_w = select_best_resolution((height, width), self.image_grid_pinpoints)
        return 1 + len(range(0, best_h, self._tile)) * len(range(0, best_w, self._tile))

    def num_tokens_for_size(self, height: int, width: int, *, field: str = "image") -> int:
        """Number of ``<image>`` tokens for an image of this size (``LlavaNextProcessor`` logic)."""
        if height <= 0 or width <= 0:
            raise ImageError(field, f"image has zero size ({width}x{height} pixels)")
        return self._num_tokens(height, width, *self.output_size)

    def _num_tokens(self, orig_height: int, orig_width: int, height: int, width: int) -> int:
        best_h, best_w = select_best_resolution([orig_height, orig_width], self.image_grid_pinpoints)
        scale_height, scale_width = best_h // height, best_w // width
        patches_height = height // self.vision_patch_size
        patches_width = width // self.vision_patch_size
        unpadded, newlines = _unpadded_features(
            orig_height, orig_width, patches_height, patches_width, scale_height, scale_width
        )
        base = patches_height * patches_width + self.num_additional_image_tokens
        num = unpadded + newlines + base
        if self.vision_feature_select_strategy == "default":
            num -= 1
        return num

    # ----------------------------------------------------------------- processing

    def __call__(self, image: Image.Image, *, field: str = "image") -> LlavaNextImageInput:
        """Preprocess one image (any PIL mode; converted to RGB as transformers does)."""
        if not isinstance(image, Image.Image):
            raise ImageError(field, f"expected a PIL image, got {type(image).__name__}; use load_image() first")
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageError(field, f"image has zero size ({width}x{height} pixels)")
        image = to_rgb(image)

        best = select_best_resolution((height, width), self.image_grid_pinpoints)
        new_h, new_w = get_patch_output_size((height, width), best)
        resized = np.asarray(image.resize((new_w, new_h), resample=self.resample))
        pad_h, rem_h = divmod(best[0] - new_h, 2)
        pad_w, rem_w = divmod(best[1] - new_w, 2)
        padded = np.pad(resized, ((pad_h, pad_h + rem_h), (pad_w, pad_w + rem_w), (0, 0)))
        tiles = [
            padded[i : i + self._tile, j : j + self._tile]
            for i in range(0, padded.shape[0], self._tile)
            for j in range(0, padded.shape[1], self._tile)
        ]
        base_h, base_w = self._base_size
        base = np.asarray(image.resize((base_w, base_h), resample=self.resample))

        out = []
        for tile in [base, *tiles]:
            if self.do_resize:
                tile = _pil_resize(tile, _resize_target(tile.shape[:2], self.size), self.resample)
            if self.do_center_crop:
                tile = _center_crop(tile, (self.crop_size["height"], self.crop_size["width"]))
            out.append(tile)
        if len({t.shape for t in out}) != 1:
            raise ValueError(
                f"LLaVA-NeXT tiles have different shapes {sorted({t.shape for t in out})}; check size/crop_size"
            )
        stacked = np.stack(out)  # (N, H, W, 3) uint8
        values = apply_lut(stacked, self._lut, channel_axis=-1)
        pixel_values = torch.from_numpy(np.ascontiguousarray(values.transpose(0, 3, 1, 2)))
        tile_h, tile_w = pixel_values.shape[-2:]
        return LlavaNextImageInput(
            pixel_values=pixel_values,
            image_size=(height, width),
            num_tokens=self._num_tokens(height, width, tile_h, tile_w),
        )


# --------------------------------------------------------------------------- helpers


def _unpadded_features(
    height: int, width: int, patches_height: int, patches_width: int, scale_height: int, scale_width: int
) -> tuple[int, int]:
    """Feature-grid size after removing the padding rows/columns (``_get_unpadded_features``)."""
    current_height = patches_height * scale_height
    current_width = patches_width * scale_width
    original_aspect_ratio = width / height
    current_aspect_ratio = current_width / current_height
    if original_aspect_ratio > current_aspect_ratio:
        new_height = int(round(height * (current_width / width), 7))
        padding = (current_height - new_height) // 2
        current_height -= padding * 2
    else:
        new_width = int(round(width * (current_height / height), 7))
        padding = (current_width - new_width) // 2
        current_width -= padding * 2
    return current_height * current_width, current_height


def _size_dict(size: Mapping[str, int] | int | Sequence[int], name: str, *, square: bool) -> dict[str, int]:
    """Normalise a size setting the way transformers' ``get_size_dict`` does."""
    if isinstance(size, Mapping):
        d = {k: int(v) for k, v in size.items() if v is not None}
    elif isinstance(size, int):
        d = {"height": size, "width": size} if square else {"shortest_edge": size}
    elif isinstance(size, Sequence) and len(size) == 2:
        d = {"height": int(size[0]), "width": int(size[1])}
    else:
        raise ValueError(f"{name} must be an int, (height, width) or a dict, got {size!r}")
    if not (("height" in d and "width" in d) or "shortest_edge" in d):
        raise ValueError(f"{name} must have height+width or shortest_edge, got {d}")
    return d


def _resize_target(hw: Sequence[int], size: Mapping[str, int]) -> tuple[int, int]:
    """Output ``(height, width)`` of transformers' ``PilBackend.resize`` for a size dict."""
    height, width = int(hw[0]), int(hw[1])
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    if shortest and longest:
        return _size_with_aspect_ratio(height, width, shortest, longest)
    if shortest:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = shortest, int(shortest * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    return size["height"], size["width"]


def _size_with_aspect_ratio(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    """transformers' ``get_size_with_aspect_ratio``."""
    raw_size = None
    min_original, max_original = float(min(height, width)), float(max(height, width))
    if max_original / min_original * size > max_size:
        raw_size = max_size * min_original / max_original
        size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        ow = size
        oh = int(raw_size * height / width) if raw_size is not None else int(size * height / width)
    else:
        oh = size
        ow = int(raw_size * width / height) if raw_size is not None else int(size * width / height)
    return oh, ow


def _pil_resize(pixels: np.ndarray, hw: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    if pixels.shape[:2] == tuple(hw):
        return pixels  # PIL returns an identical copy for a same-size resize
    return np.asarray(Image.fromarray(pixels).resize((hw[1], hw[0]), resample=resample))


def _center_crop(pixels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """transformers' ``center_crop`` on HWC data: crop, zero-padding first if the image is smaller."""
    orig_h, orig_w = pixels.shape[:2]
    crop_h, crop_w = int(hw[0]), int(hw[1])
    top = (orig_h - crop_h) // 2
    left = (orig_w - crop_w) // 2
    if top >= 0 and left >= 0 and top + crop_h <= orig_h and left + crop_w <= orig_w:
        return pixels[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, orig_h), max(crop_w, orig_w)
    canvas = np.zeros((new_h, new_w, *pixels.shape[2:]), dtype=pixels.dtype)
    top_pad = math.ceil((new_h - orig_h) / 2)
    left_pad = math.ceil((new_w - orig_w) / 2)
    canvas[top_pad : top_pad + orig_h, left_pad : left_pad + orig_w] = pixels
    top += top_pad
    left += left_pad
    return canvas[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]
