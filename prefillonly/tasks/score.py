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
from ..errors import InvalidRequestError, PromptTooLongError
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


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the shared start of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def document_room(fixed: int, n_doc: int, max_model_len: int, truncate: int | None, field: str,
                  what: str = "document") -> int:
    """How many of a document's ``n_doc`` tokens fit next to ``fixed`` tokens that are never cut.

    A reranker user expects ``truncate`` to shorten the document (as TEI and
    vLLM do), never the template, the instruction or the query: those make the
    ``fixed`` part. The whole prompt fits in ``min(truncate, max_model_len)``;
    without ``truncate`` an over-long pair is refused, not silently cut.
    """
    limit = max_model_len if truncate is None else min(truncate, max_model_len)
    if fixed + n_doc <= limit:
        return n_doc
    rest = f"the rest of the prompt (template, instruction, query, images) takes {fixed} tokens"
    if fixed >= max_model_len:
        raise PromptTooLongError(
            field, f"no room for the {what} within max_model_len={max_model_len}: {rest}; "
            "shorten the query or instruction, or raise max_model_len",
        )
    if truncate is None:
        raise PromptTooLongError(
            field, f"{fixed + n_doc} tokens exceed max_model_len={max_model_len}; "
            f"pass truncate=N to cut the {what}, or raise max_model_len",
        )
    if fixed >= truncate:
        raise InvalidRequestError(field, f"truncate={truncate} leaves no room for the {what}: {rest}; pass truncate > {fixed}")
    return limit - fixed


def cut(ids: list[int], keep: int, side: str) -> list[int]:
    """``keep`` tokens of ``ids``: the first ones (side "right" cuts the end) or the last ones."""
    return ids[:keep] if side == "right" else ids[len(ids) - keep :]


class ScoreTask(Task[ScoreResult]):
    """Qwen3-Reranker scoring of one query against many text documents.

    The body is tokenised as one text, exactly as the model card does; when it
    must be truncated only the document's own tokens are cut, so the system
    prompt, instruction, query and the assistant tail always stay whole.
    """

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
        before, sep, after = template.body.partition("{document}")
        if not sep:
            raise InvalidRequestError("template", "the body must contain a {document} field")
        fill = {"instruction": self.instruction, "query": query}
        self.before, self.after = before.format(**fill), after.format(**fill)
        # The body's tokens that come from the text before/after the document: a full body shares
        # them as a common prefix/suffix (a token at the seam that also holds document characters
        # differs, and is counted as the document's).
        self.before_ids = tokenizer(self.before)["input_ids"]
        self.after_ids = tokenizer(self.after)["input_ids"]
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
        return self.tokenizer(self.before + document + self.after)["input_ids"]

    def document_span(self, ids: list[int]) -> tuple[int, int]:
        """[start, stop) of the document's tokens in the body ``ids``."""
        start = _common_prefix(ids, self.before_ids)
        tail = _common_prefix(ids[::-1], self.after_ids[::-1])
        return start, max(start, len(ids) - tail)

    def sequences(self, item, field, enc):
        if not isinstance(item, str):
            raise InvalidRequestError(field, f"expected a string document; got {type(item).__name__}")
        if not item.strip():
            raise InvalidRequestError(field, "document is empty")
        body = self.body_ids(item)
        start, stop = self.document_span(body)
        fixed = len(self.prefix_ids) + len(body) - (stop - start) + len(self.suffix_ids)
        keep = document_room(fixed, stop - start, enc.max_model_len, self.truncate, field)
        if keep < stop - start:
            body = body[:start] + cut(body[start:stop], keep, self.side) + body[stop:]
        return [Sequence(self.prefix_ids + body + self.suffix_ids, Pooling.LAST)]

    def result(self, item, outputs):
        return ScoreResult(score=float(torch.sigmoid(outputs[0][0, 0].double())))

    def failed(self, item, message):
        return ScoreResult(error=message)
