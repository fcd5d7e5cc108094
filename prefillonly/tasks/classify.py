"""Which of a set of labels the model answers, normalised over the labels.

Single-token labels read only their rows of the LM head. Labels of several
tokens are scored exactly: the prompt is followed by the label, and the label's
log-probability is the sum of its tokens' log-probabilities.
A sequence-classification checkpoint uses its ``score`` head and its own labels.
"""

from __future__ import annotations

import torch

from ..engine.sequence import Pooling, Sequence
from ..errors import InvalidRequestError
from ..outputs import ClassifyResult
from .base import ContinuationHead, LabelRowsHead, ScoreHead, Task


def tokenize_labels(tokenizer, labels: list[str]) -> list[list[int]]:
    if len(set(labels)) != len(labels):
        raise InvalidRequestError("labels", "contains duplicates; each label must be distinct")
    out = []
    for j, label in enumerate(labels):
        ids = tokenizer.encode(label, add_special_tokens=False)
        if not ids:
            raise InvalidRequestError(f"labels[{j}]", f"label {label!r} tokenises to nothing; use visible text")
        out.append(ids)
    return out


class ClassifyTask(Task[ClassifyResult]):
    name = "classify"

    def __init__(self, labels: list[str], label_ids: list[list[int]] | None, truncate, side, use_score_head: bool) -> None:
        self.labels = labels
        self.label_ids = label_ids
        self.truncate, self.side = truncate, side
        self.mode = "score_head" if use_score_head else "rows" if all(len(t) == 1 for t in label_ids) else "continuation"
        if self.mode == "score_head":
            self.head = ScoreHead()
        elif self.mode == "rows":
            self.head = LabelRowsHead([t[0] for t in label_ids])
        else:
            self.head = ContinuationHead()

    def sequences(self, item, field, enc):
        if self.mode != "continuation":
            ids = enc.fit(enc.encode(item, field), field, self.truncate, self.side)
            return [Sequence(ids, Pooling.LAST)]
        longest = max(len(t) for t in self.label_ids)
        ids = enc.fit(enc.encode(item, field), field, self.truncate, self.side, reserved=longest - 1)
        seqs = []
        for label in self.label_ids:
            n = len(ids)
            rows = tuple(range(n - 1, n - 1 + len(label)))
            seqs.append(Sequence(ids + label[:-1], rows, targets=tuple(label)))
        return seqs

    def result(self, item, outputs):
        if self.mode == "continuation":
            scores = torch.stack([o[:, 0].sum() for o in outputs])
        else:
            scores = outputs[0][0]
        if len(self.labels) == 1:  # a one-logit classifier is a sigmoid
            probs = torch.sigmoid(scores.double()).tolist()
        else:
            probs = torch.softmax(scores.double(), dim=0).tolist()
        values = scores.tolist()
        best = max(range(len(self.labels)), key=lambda j: probs[j])
        return ClassifyResult(
            label=self.labels[best],
            probs=dict(zip(self.labels, probs)),
            logits=dict(zip(self.labels, values)),
        )

    def failed(self, item, message):
        return ClassifyResult(error=message)
