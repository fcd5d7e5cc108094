"""prefillonly: prefill-only inference for discriminative LLM work (classify, score, embed, next token)."""

from .errors import (CheckpointError, ImageError, InvalidRequestError, OutOfMemoryError, PrefillOnlyError,
                     PromptTooLongError)
from .llm import LLM
from .outputs import ClassifyResult, EmbedResult, NextTokenResult, RerankResult, ScoreResult, TokenLogprob

__all__ = [
    "LLM", "ClassifyResult", "EmbedResult", "NextTokenResult", "RerankResult", "ScoreResult", "TokenLogprob",
    "PrefillOnlyError", "InvalidRequestError", "PromptTooLongError", "ImageError", "CheckpointError", "OutOfMemoryError",
]
__version__ = "0.1.0"
