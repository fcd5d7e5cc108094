"""The engine as a batch-job processor: request dicts in, result columns (or error strings) out."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequestError
from .spec import JobSpec

_ENGINE_KEYS = ("dtype", "device", "max_num_batched_tokens", "max_model_len")


class EngineProcessor:
    """Runs one job's task on an :class:`~prefillonly.LLM` over a batch of rows.

    Rows that fail (empty text, unusable image, too long without ``truncate``)
    come back as their error message; the job writes them to its errors file.
    """

    def __init__(self, llm, spec: JobSpec) -> None:
        self.llm = llm
        self.task = spec.task
        opts = dict(spec.task_options)
        self.common = {k: opts.pop(k) for k in ("truncate", "truncation_side") if k in opts}
        self.opts = opts
        if self.task == "score" and not isinstance(opts.get("query"), str):
            raise InvalidRequestError("task_options.query", "score needs a query string, e.g. --query 'what is a panda?'")
        allowed = {
            "classify": {"labels"},
            "score": {"query", "instruction"},
            "embed": {"dimensions", "normalize", "instruction", "prompt_name", "pooling"},
            "next_token": {"top_k"},
        }[self.task]
        unknown = sorted(set(opts) - allowed)
        if unknown:
            raise InvalidRequestError(
                f"task_options.{unknown[0]}", f"is not an option of {self.task}; options: {', '.join(sorted(allowed | {'truncate', 'truncation_side'}))}"
            )

    def __call__(self, requests: list[dict[str, Any]]) -> list[dict[str, Any] | str]:
        prompts = [r["text"] if "text" in r else r["messages"] for r in requests]
        kwargs: dict[str, Any] = dict(self.common, use_tqdm=False)
        if any("images" in r for r in requests):
            kwargs["images"] = [[i for i in r.get("images", []) if i is not None] or None for r in requests]
        before = self.llm.runner.tokens_processed
        results = self._run(prompts, kwargs)
        done = [r for r in results if r.error is None]
        share = (self.llm.runner.tokens_processed - before) // max(len(done), 1)
        out: list[dict[str, Any] | str] = []
        for r in results:
            if r.error is not None:
                out.append(r.error)
            else:
                row = self._columns(r)
                row["_tokens"] = share
                out.append(row)
        return out

    def _run(self, prompts, kwargs):
        llm, o = self.llm, self.opts
        if self.task == "classify":
            return llm.classify(prompts, labels=o["labels"], **kwargs)
        if self.task == "score":
            return llm.score(o["query"], prompts, instruction=o.get("instruction"), **kwargs)
        if self.task == "embed":
            keys = ("dimensions", "normalize", "instruction", "prompt_name", "pooling")
            return llm.embed(prompts, **{k: o[k] for k in keys if k in o}, **kwargs)
        return llm.next_token(prompts, top_k=o.get("top_k", 5), **kwargs)

    def _columns(self, r) -> dict[str, Any]:
        if self.task == "classify":
            return {"label": r.label, "probs": r.probs}
        if self.task == "score":
            return {"score": r.score}
        if self.task == "embed":
            return {"embedding": r.embedding.tolist()}
        return {"token_id": r.token_id, "token": r.token, "logprob": r.logprob}


def engine_kwargs(spec: JobSpec) -> dict[str, Any]:
    """LLM constructor arguments from the job's ``engine`` settings."""
    unknown = sorted(set(spec.engine) - set(_ENGINE_KEYS))
    if unknown:
        raise InvalidRequestError(f"engine.{unknown[0]}", f"unknown engine setting; known: {', '.join(_ENGINE_KEYS)}")
    return dict(spec.engine)
