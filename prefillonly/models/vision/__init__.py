"""Vision towers and the vision-language wrapper around the engine's decoder."""

from __future__ import annotations

from typing import Any

from ...errors import CheckpointError
from .cache import EncoderCache, EncoderStats
from .inputs import ImageItem, ImageRef
from .vlm import VisionInfo, VisionLanguageModel

__all__ = [
    "EncoderCache", "EncoderStats", "ImageItem", "ImageRef", "VisionInfo", "VisionLanguageModel", "vision_info",
]


def _token_id(config: Any, *names: str) -> int | None:
    for name in names:
        for cfg in (config, getattr(config, "text_config", None)):
            value = getattr(cfg, name, None) if cfg is not None else None
            if value is not None:
                return int(value)
    return None


def vision_info(config: Any, kind: str, architectures: list[str]) -> VisionInfo:
    """Tower spec, placeholder token ids and position scheme of a vision-language checkpoint."""
    if kind == "llava_next":
        from .llava_next import llava_next_spec

        tower = llava_next_spec(config)
        image_token = _token_id(config, "image_token_id", "image_token_index")
        if image_token is None:
            raise CheckpointError("config.json: LLaVA-NeXT needs image_token_index")
        return VisionInfo(kind, tower, image_token)
    from .qwen_vit import qwen_vision_spec

    tower = qwen_vision_spec(config, kind)
    image_token = _token_id(config, "image_token_id")
    if image_token is None:
        raise CheckpointError("config.json: a Qwen-VL checkpoint needs image_token_id")
    return VisionInfo(
        kind,
        tower,
        image_token,
        vision_start_token_id=_token_id(config, "vision_start_token_id"),
        vision_end_token_id=_token_id(config, "vision_end_token_id"),
        mrope=True,
        merge_size=tower.merge_size,
        score_head="jina" if "JinaVLForRanking" in architectures else None,
    )
