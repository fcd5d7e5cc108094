"""Sentence embeddings: pooled final hidden states, optionally truncated and L2-normalised."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..engine.sequence import Head, Pooling, Sequence
from ..errors import InvalidRequestError
from ..outputs import EmbedResult
from .base import Task


class IdentityHead(Head):
    def __call__(self, model, rows, targets):
        return rows


class EmbedHead(Head):
    """Truncate to ``dimensions`` and L2-normalise, batched on the model's device."""

    def __init__(self, dimensions: int | None, normalize: bool) -> None:
        self.dimensions, self.normalize = dimensions, normalize

    def __call__(self, model, rows, targets):
        vec = rows.float()
        if self.dimensions is not None:
            vec = vec[:, : self.dimensions]
        return torch.nn.functional.normalize(vec, dim=-1) if self.normalize else vec


def pooling_from_checkpoint(path: Path) -> Pooling:
    """sentence-transformers' pooling config when the checkpoint has one, else LAST."""
    modules = path / "modules.json"
    if modules.is_file():
        try:
            for module in json.loads(modules.read_text()):
                if module.get("type", "").endswith("Pooling"):
                    cfg = json.loads((path / module["path"] / "config.json").read_text())
                    if cfg.get("pooling_mode_lasttoken"):
                        return Pooling.LAST
                    if cfg.get("pooling_mode_mean_tokens"):
                        return Pooling.MEAN
                    if cfg.get("pooling_mode_cls_token"):
                        return Pooling.CLS
        except (OSError, json.JSONDecodeError, KeyError):
            pass
    return Pooling.LAST


def prompts_from_checkpoint(path: Path) -> dict[str, str]:
    cfg = path / "config_sentence_transformers.json"
    if cfg.is_file():
        try:
            return dict(json.loads(cfg.read_text()).get("prompts") or {})
        except (OSError, json.JSONDecodeError):
            pass
    return {}


class EmbedTask(Task[EmbedResult]):
    name = "embed"

    def __init__(self, pooling: Pooling, prefix: str, dimensions: int | None, normalize: bool, truncate, side) -> None:
        self.pooling = pooling
        self.prefix = prefix
        self.dimensions = dimensions
        self.normalize = normalize
        self.truncate, self.side = truncate, side
        self.head = EmbedHead(dimensions, normalize)

    def sequences(self, item, field, enc):
        if isinstance(item, str):
            if not item.strip():
                raise InvalidRequestError(field, "text is empty")
            item = self.prefix + item
        ids = enc.fit(enc.encode(item, field), field, self.truncate, self.side)
        return [Sequence(ids, self.pooling)]

    def result(self, item, outputs):
        return EmbedResult(embedding=outputs[0][0].numpy())  # truncated and normalised by EmbedHead

    def failed(self, item, message):
        return EmbedResult(error=message)
