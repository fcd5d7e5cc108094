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


def text_family(architectures: list[str]) -> str | None:
    """The decoder family of the first architecture we know, or None."""
    for arch in architectures:
        if arch in TEXT_ARCHITECTURES:
            return TEXT_ARCHITECTURES[arch]
    return None


def supported_architectures() -> list[str]:
    return sorted(TEXT_ARCHITECTURES)
