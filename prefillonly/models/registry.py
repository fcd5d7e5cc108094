"""Architectures we run, keyed by the ``architectures`` field of config.json."""

from __future__ import annotations

_FAMILIES = {
    "Llama": "llama",
    "Qwen2": "qwen2",
    "Qwen3": "qwen3",
    "Gemma2": "gemma2",
    "Gemma3": "gemma3",
}
_SUFFIXES = ("ForCausalLM", "ForSequenceClassification", "Model")

TEXT_ARCHITECTURES: dict[str, str] = {
    prefix + suffix: family for prefix, family in _FAMILIES.items() for suffix in _SUFFIXES
}
# Gemma 3's text-only checkpoints.
TEXT_ARCHITECTURES["Gemma3TextModel"] = "gemma3"

# Vision-language checkpoints: (decoder family, vision tower kind).
VISION_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "Qwen2VLForConditionalGeneration": ("qwen2", "qwen2_vl"),
    "Qwen2VLModel": ("qwen2", "qwen2_vl"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2", "qwen2_5_vl"),
    "Qwen2_5_VLModel": ("qwen2", "qwen2_5_vl"),
    "Qwen3VLForConditionalGeneration": ("qwen3", "qwen3_vl"),
    "Qwen3VLModel": ("qwen3", "qwen3_vl"),
    "JinaVLForRanking": ("qwen2", "qwen2_vl"),  # jina-reranker-m0: Qwen2-VL with an MLP score head
    "LlavaNextForConditionalGeneration": ("llama", "llava_next"),
}


def text_family(architectures: list[str]) -> str | None:
    """The decoder family of the first architecture we know, or None."""
    for arch in architectures:
        if arch in TEXT_ARCHITECTURES:
            return TEXT_ARCHITECTURES[arch]
        if arch in VISION_ARCHITECTURES:
            return VISION_ARCHITECTURES[arch][0]
    return None


def vision_kind(architectures: list[str]) -> str | None:
    """The vision tower of the first architecture we know, or None for text-only models."""
    for arch in architectures:
        if arch in TEXT_ARCHITECTURES:
            return None
        if arch in VISION_ARCHITECTURES:
            return VISION_ARCHITECTURES[arch][1]
    return None


def supported_architectures() -> list[str]:
    return sorted([*TEXT_ARCHITECTURES, *VISION_ARCHITECTURES])
