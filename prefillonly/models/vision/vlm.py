"""A decoder with a vision tower: image features replace the image placeholder tokens.

The language side is the engine's own :class:`~prefillonly.models.CausalLM`
(same layers, heads and weights layout); this class only changes how a step's
input embeddings are built (and, for Qwen3-VL, adds the deepstack features to
the image rows after the first decoder layers). The runner sees the same
interface: ``hidden_states(step)``, ``final_norm``, ``logits``, ``score``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..decoder import CausalLM
from ..spec import DecoderSpec
from .cache import EncoderCache, EncoderStats
from .inputs import ImageItem, ImageRef

DEFAULT_ENCODER_CACHE_BYTES = 1 << 30
JINA_LOGIT_BIAS = 2.65


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


_POOL = None


def _preprocess(items: list[ImageItem]) -> list[Any]:
    """Pixels of the images a step must encode; several images are resized and normalised in threads
    (PIL and numpy release the GIL), while the GPU is still busy with the previous step."""
    global _POOL
    if len(items) < 2:
        return [item.data() for item in items]
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="vl-preprocess")
    return list(_POOL.map(ImageItem.data, items))


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

    @property
    def tower(self) -> nn.Module:
        return self.vision if self.info.kind == "llava_next" else self.visual

    # -- images -------------------------------------------------------------------------------

    def encode_images(self, items: list[ImageItem]) -> dict[str, tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        """Features of each distinct image: from the cache, or from one tower call for all misses."""
        found: dict[str, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}
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
        if todo:
            outs = self.tower.encode(_preprocess(todo))
            stats.calls += 1
            stats.images_encoded += len(todo)
            for item, feat in zip(todo, outs):
                found[item.key] = feat
                self.encoder_cache.put(item.key, feat)
                item.release()
        return found

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
        hidden = self.model.embed(step.input_ids)
        placed = self._image_rows(step)
        if placed is None:
            return self.model(hidden, step.positions, step.meta)
        rows_cpu, refs = placed
        feats = self.encode_images([r.item for r in refs])
        rows = rows_cpu.to(hidden.device, non_blocking=True)
        main = torch.cat([feats[r.item.key][0] for r in refs]).to(hidden.dtype)
        hidden = hidden.index_copy(0, rows, main)
        levels = len(feats[refs[0].item.key][1])
        deep = [torch.cat([feats[r.item.key][1][j] for r in refs]).to(hidden.dtype) for j in range(levels)]
        for i, layer in enumerate(self.model.layers):
            hidden = layer(hidden, step.positions, step.meta)
            if i < len(deep):
                hidden = hidden.index_add(0, rows, deep[i])
        return hidden
