"""A decoder with a vision tower: image features replace the image placeholder tokens.

The language side is the engine's own :class:`~prefillonly.models.CausalLM`
(same layers, heads and weights layout); this class only changes how a step's
input embeddings are built (and, for Qwen3-VL, adds the deepstack features to
the image rows after the first decoder layers). The runner sees the same
interface: ``hidden_states(step)``, ``final_norm``, ``logits``, ``score``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ...vision.preprocess_pool import prefetch
from ...vision.qwen_preprocess import QwenPixels
from ..attention import to_device
from ..decoder import CausalLM
from ..spec import DecoderSpec
from .cache import EncoderCache, EncoderStats, Features
from .inputs import ImageItem, ImageRef

DEFAULT_ENCODER_CACHE_BYTES = 256 << 20
JINA_LOGIT_BIAS = 2.65
# Steps whose pixels are prepared while the current one runs: enough to hide preprocessing behind the GPU,
# few enough that the pixels held stay within a few steps' worth (each step is bounded by the token budget).
PREFETCH_STEPS = 2
# Patches per tower call, for a tower whose MLP is 4096 wide (Qwen3-VL-2B's); a wider MLP gets proportionally
# fewer, since its activations set the call's peak memory. Qwen3-VL's V2 is 21 ms faster at 32K than at 16K, and
# no faster at 64K, which costs 1 GiB more (bench/NOTES.md #23).
TOWER_MAX_PATCHES = 32768
# Pixels go up on a stream of their own: on the compute stream each copy (V2's 722 MB: ~14 ms) would hold up
# the kernels queued behind it; on a side stream it overlaps the previous tower call.
UPLOAD_STREAM = True
# Qwen images reach a GPU as resized uint8 pixels and are patchified there (QwenPixels).
DEVICE_PATCHIFY = True


@dataclass
class VisionInfo:
    """What the prompt side and the model share about a checkpoint's images."""

    kind: str  # "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl" | "llava_next"
    tower: Any  # the tower's spec
    image_token_id: int
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    mrope: bool = False  # the LM takes (3, N) M-RoPE positions
    merge_size: int = 1
    score_head: str | None = None  # "jina" for jina-reranker-m0's MLP head


class JinaScore(nn.Module):
    """jina-reranker-m0's head: out_proj(relu(dense(h))) - 2.65, so sigmoid gives the score."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.relu(self.dense(x))) - JINA_LOGIT_BIAS


def _build_tower(info: VisionInfo) -> nn.Module:
    if info.kind == "llava_next":
        from .llava_next import LlavaNextVision

        return LlavaNextVision(info.tower)
    from .qwen_vit import QwenVisionTower

    return QwenVisionTower(info.tower)


def _arrive(x: Any, device: torch.device) -> Any:
    """One preprocessed image with its pixels copied to ``device`` (and patchified there if they came raw)."""
    if isinstance(x, QwenPixels):
        return replace(x, pixels=to_device(x.pixels, device)).patchify()
    return replace(x, pixel_values=to_device(x.pixel_values, device))


def _step_images(seqs: list) -> list[ImageItem]:
    return [ref.item for seq in seqs for ref in seq.extras.get("images", ())]


class VisionLanguageModel(CausalLM):
    def __init__(self, spec: DecoderSpec, info: VisionInfo) -> None:
        super().__init__(spec)
        self.info = info
        tower = _build_tower(info)
        # Attribute names follow the checkpoints: Qwen's tower is ``visual``; LLaVA's parts sit at the top.
        if info.kind == "llava_next":
            self.vision = tower
        else:
            self.visual = tower
        if info.score_head == "jina":
            self.score = JinaScore(spec.hidden_size)
        self.encoder_cache = EncoderCache(DEFAULT_ENCODER_CACHE_BYTES)
        self.encoder_stats = EncoderStats()
        self._upload: torch.cuda.Stream | None = None  # created on first use, on the tower's GPU

    @property
    def tower(self) -> nn.Module:
        return self.vision if self.info.kind == "llava_next" else self.visual

    # -- images -------------------------------------------------------------------------------

    def pixel_options(self) -> dict[str, Any]:
        """How the preprocessor should hand over pixels: Qwen's in the tower's dtype and, for a GPU, in
        page-locked memory, so that the copy is asynchronous (a copy from pageable memory waits for the GPU's
        queue to drain, which stalls the pipelined steps), and as resized uint8 pixels that the GPU patchifies
        (a quarter of the bytes to copy, and most of the workers' time saved: bench/NOTES.md #25)."""
        if self.info.kind == "llava_next":
            return {}
        gpu = self._device().type == "cuda"
        return {"dtype": self.tower.dtype, "pin_memory": gpu, "patchify": not (gpu and DEVICE_PATCHIFY)}

    def _device(self) -> torch.device:
        return next(self.tower.parameters()).device

    def prepare_steps(self, steps: list[list]) -> Iterator[dict[int, Exception]]:
        """Preprocess the images of ``steps`` (lists of sequences, in run order) in worker threads.

        The runner takes one value per step just before running it: the
        positions of the step's sequences whose image could not be preprocessed,
        with the error, so that they fail alone. Meanwhile the images of the next
        :data:`PREFETCH_STEPS` steps are being processed: the CPU works ahead of
        the GPU, and no more than that many steps' pixels are held.
        """
        images = [_step_images(seqs) for seqs in steps]
        options = self.pixel_options()
        failed: dict[ImageItem, Exception] = {}
        work = prefetch(lambda item: item.process(item.image, **options), images, ahead=PREFETCH_STEPS,
                        wanted=lambda item: item.key not in self.encoder_cache)
        try:
            for seqs, done in zip(steps, work):
                for item, out in done:
                    if isinstance(out, Exception):
                        failed[item] = out
                    else:
                        item.ready(out)
                bad: dict[int, Exception] = {}
                for j, seq in enumerate(seqs):
                    error = next((failed[r.item] for r in seq.extras.get("images", ()) if r.item in failed), None)
                    if error is not None:
                        bad[j] = error
                yield bad
        finally:
            work.close()
            for item in (item for step in images for item in step):
                item.release()  # pixels of steps that did not run

    def encode_images(self, items: list[ImageItem]) -> dict[str, Features]:
        """Features of each distinct image: from the cache, or from tower calls of at most
        :data:`TOWER_MAX_PATCHES` patches over the misses."""
        found: dict[str, Features] = {}
        todo: list[ImageItem] = []
        stats = self.encoder_stats
        for item in items:
            if item.key in found:
                continue
            cached = self.encoder_cache.get(item.key)
            if cached is not None:
                found[item.key] = cached
                stats.hits += 1
            else:
                found[item.key] = None  # type: ignore[assignment]
                todo.append(item)
                stats.misses += 1
        options = self.pixel_options()
        for chunk in self._chunks(todo):
            outs = self.tower.encode(self._on_device([item.data(**options) for item in chunk]))
            stats.calls += 1
            stats.images_encoded += len(chunk)
            for item, feat in zip(chunk, outs):
                found[item.key] = self.encoder_cache.put(item.key, feat)
                item.release()
        return found

    def _chunks(self, items: list[ImageItem]) -> Iterator[list[ImageItem]]:
        """Consecutive runs of ``items`` of at most TOWER_MAX_PATCHES patches (fewer for a wider MLP; a larger
        image goes alone)."""
        unit = self.info.merge_size**2
        spec = self.info.tower
        mlp = getattr(spec, "intermediate_size", 4096) * (2 if self.info.kind == "qwen2_5_vl" else 1)  # gated: x2
        limit = max(1, TOWER_MAX_PATCHES * 4096 // max(mlp, 4096))
        chunk: list[ImageItem] = []
        patches = 0
        for item in items:
            n = item.num_tokens * unit
            if chunk and patches + n > limit:
                yield chunk
                chunk, patches = [], 0
            chunk.append(item)
            patches += n
        if chunk:
            yield chunk

    def _on_device(self, inputs: list[Any]) -> list[Any]:
        """The inputs with their pixels on the tower's device (``QwenPixels`` patchified there). From page-locked
        memory the copies are queued without waiting; on a GPU they (and the patchifying) run on the upload
        stream, and the compute stream waits for them only where the tower starts."""
        device = self._device()
        todo = [i for i, x in enumerate(inputs) if isinstance(x, QwenPixels) or x.pixel_values.device != device]
        if not todo:
            return inputs
        out = list(inputs)
        if device.type != "cuda" or not UPLOAD_STREAM:
            for i in todo:
                out[i] = _arrive(inputs[i], device)
            return out
        if self._upload is None:
            self._upload = torch.cuda.Stream(device)
        compute = torch.cuda.current_stream(device)
        with torch.cuda.stream(self._upload):
            for i in todo:
                out[i] = _arrive(inputs[i], device)
                out[i].pixel_values.record_stream(compute)  # freed after the tower's kernels, not the upload's
        compute.wait_stream(self._upload)
        return out

    def _image_rows(self, step) -> tuple[torch.Tensor, list[ImageRef]] | None:
        starts: list[torch.Tensor] = []
        refs: list[ImageRef] = []
        offset = 0
        for seq in step.seqs:
            for ref in seq.extras.get("images", ()):
                starts.append(torch.arange(offset + ref.start, offset + ref.stop))
                refs.append(ref)
            offset += len(seq)
        if not refs:
            return None
        return torch.cat(starts), refs

    def hidden_states(self, step) -> torch.Tensor:
        placed = self._image_rows(step)
        if placed is None:
            return self.model(self.model.embed(step.input_ids), step.positions, step.meta, step.tail)
        rows_cpu, refs = placed
        feats = self.encode_images([r.item for r in refs])  # first: the tower's peak does not hold the embeddings
        hidden = self.model.embed(step.input_ids)
        rows = to_device(rows_cpu, hidden.device)
        main = torch.cat([feats[r.item.key][0] for r in refs]).to(hidden.dtype)
        hidden = hidden.index_copy(0, rows, main)
        levels = len(feats[refs[0].item.key][1])
        deep = [torch.cat([feats[r.item.key][1][j] for r in refs]).to(hidden.dtype) for j in range(levels)]
        del feats, main
        layers = self.model.layers
        # the last layer computes only the tail's rows, unless deepstack features still go into its output
        tail = step.tail if len(deep) < len(layers) else None
        for i, layer in enumerate(layers):
            hidden = layer(hidden, step.positions, step.meta, tail if i == len(layers) - 1 else None)
            if i < len(deep):
                hidden = hidden.index_add(0, rows, deep[i])
        if step.tail is not None and tail is None:
            hidden = hidden.index_select(0, step.tail.index)
        return hidden
