"""Relevance of documents to a query, the Qwen3-Reranker way.

A causal LM judges "yes" or "no" after a fixed template; the score is
sigmoid(logit_yes - logit_no), computed from the difference of two LM-head
rows, so no full-vocabulary matmul runs. A checkpoint with a one-label
``score`` head uses that head on the same template instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.sequence import Head, Pooling, Sequence
from ..errors import InvalidRequestError
from ..outputs import ScoreResult
from .base import ScoreHead, Task, device_copy

DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@dataclass(frozen=True)
class RerankTemplate:
    """Prompt around a (query, document) pair and the two answer tokens."""

    prefix: str = (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
        'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    )
    suffix: str = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    body: str = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    yes: str = "yes"
    no: str = "no"


QWEN3_RERANKER = RerankTemplate()


class YesNoHead(Head):
    """(W_yes - W_no) . h: one row, the log-odds of "yes"."""

    def __init__(self, yes_id: int, no_id: int) -> None:
        self.ids = torch.tensor([yes_id, no_id], dtype=torch.long)
        self._on_device: dict = {}

    def __call__(self, model, rows, targets):
        logits = model.logits(rows, device_copy(self.ids, rows.device, self._on_device))
        return logits[:, :1] - logits[:, 1:]



class ScoreTask(Task[ScoreResult]):
    name = "score"

    def __init__(self, tokenizer, query: str, instruction: str | None, truncate, side, use_score_head: bool,
                 template: RerankTemplate = QWEN3_RERANKER) -> None:
        self.tokenizer = tokenizer
        self.query = query
        self.instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        self.template = template
        self.truncate, self.side = truncate, side
        self.prefix_ids = tokenizer.encode(template.prefix, add_special_tokens=False)
        self.suffix_ids = tokenizer.encode(template.suffix, add_special_tokens=False)
        if use_score_head:
            self.head = ScoreHead()
        else:
            self.head = YesNoHead(self._single_token(template.yes), self._single_token(template.no))

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise InvalidRequestError("template", f"answer {text!r} must be a single token for this tokenizer; it is {ids}")
        return ids[0]

    def body_ids(self, document: str) -> list[int]:
        body = self.template.body.format(instruction=self.instruction, query=self.query, document=document)
        return self.tokenizer(body)["input_ids"]

    def sequences(self, item, field, enc):
        if not isinstance(item, str):
            raise InvalidRequestError(field, f"expected a string document; got {type(item).__name__}")
        if not item.strip():
            raise InvalidRequestError(field, "document is empty")
        reserved = len(self.prefix_ids) + len(self.suffix_ids)
        body = enc.fit(self.body_ids(item), field, self.truncate, self.side, reserved=reserved)
        return [Sequence(self.prefix_ids + body + self.suffix_ids, Pooling.LAST)]

    def result(self, item, outputs):
        return ScoreResult(score=float(torch.sigmoid(outputs[0][0, 0].double())))

    def failed(self, item, message):
        return ScoreResult(error=message)
