"""The next token after a prompt, with its log-probability and the top-k alternatives."""

from __future__ import annotations

import torch

from ..engine.sequence import Head, Pooling, Sequence
from ..outputs import NextTokenResult, TokenLogprob
from .base import Task


class TopKHead(Head):
    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, model, rows, targets):
        logprobs = torch.log_softmax(model.logits(rows).float(), dim=-1)
        values, ids = logprobs.topk(self.k, dim=-1)
        return torch.cat([values, ids.float()], dim=-1)


class NextTokenTask(Task[NextTokenResult]):
    name = "next_token"

    def __init__(self, tokenizer, top_k: int, truncate, side) -> None:
        self.tokenizer = tokenizer
        self.top_k = top_k
        self.truncate, self.side = truncate, side
        self.head = TopKHead(top_k)

    def sequences(self, item, field, enc):
        ids = enc.fit(enc.encode(item, field), field, self.truncate, self.side)
        return [Sequence(ids, Pooling.LAST)]

    def result(self, item, outputs):
        row = outputs[0][0]
        values, ids = row[: self.top_k].tolist(), [int(i) for i in row[self.top_k :].tolist()]
        top = [TokenLogprob(t, self.tokenizer.decode([t]), v) for t, v in zip(ids, values)]
        return NextTokenResult(token_id=top[0].token_id, token=top[0].token, logprob=top[0].logprob, top_logprobs=top)

    def failed(self, item, message):
        return NextTokenResult(error=message)
