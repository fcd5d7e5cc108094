"""Typed results. Every result carries ``error``: None, or why that item failed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass
class NextTokenResult:
    token_id: int | None = None
    token: str | None = None
    logprob: float | None = None
    top_logprobs: list[TokenLogprob] = field(default_factory=list)
    error: str | None = None


@dataclass
class ClassifyResult:
    label: str | None = None
    probs: dict[str, float] = field(default_factory=dict)
    logits: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class ScoreResult:
    score: float | None = None
    error: str | None = None


@dataclass
class RerankResult:
    index: int
    score: float | None
    document: str | None = None
    error: str | None = None


@dataclass
class EmbedResult:
    embedding: np.ndarray | None = None
    error: str | None = None
