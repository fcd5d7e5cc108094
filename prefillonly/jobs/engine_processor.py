"""The engine as a batch-job processor: request dicts in, result columns (or error strings) out."""

from __future__ import annotations

import difflib
import re
from typing import Any

from ..errors import InvalidRequestError
from ..prompts import TokenCache, check_truncation
from .spec import JobSpec

_ENGINE_KEYS = ("dtype", "device", "max_num_batched_tokens", "max_model_len")
_COMMON_OPTIONS = ("truncate", "truncation_side")
#: The LLM names a failed item by its index in the call (``prompts[3]: ...``); a job's
#: error row is about the row, and must not depend on how rows happened to be batched.
#: A chat message is named within the row: ``prompts[3][0]: ...`` -> ``messages[0]: ...``.
_BATCH_INDEX = re.compile(r"^(?:prompts|documents|texts)\[\d+\](?:: |(?=\[))")
TASK_OPTIONS = {
    "classify": ("labels",),
    "score": ("query", "instruction"),
    "embed": ("dimensions", "normalize", "instruction", "prompt_name", "pooling"),
    "next_token": ("top_k",),
}


def split_task_options(spec: JobSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(common, task)`` options of the job, checked without loading a model.

    Raises InvalidRequestError naming the option (``task_options.<name>``) for an option
    the task does not take, or a missing score query, so that a typo fails before any
    engine starts (and before any worker process or Ray actor is launched).
    """
    opts = dict(spec.task_options)
    common = {k: opts.pop(k) for k in _COMMON_OPTIONS if k in opts}
    allowed = TASK_OPTIONS[spec.task]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        name = unknown[0]
        known = sorted(set(allowed) | set(_COMMON_OPTIONS))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidRequestError(
            f"task_options.{name}", f"is not an option of {spec.task}{hint}; options: {', '.join(known)}"
        )
    if spec.task == "score" and not (isinstance(opts.get("query"), str) and opts["query"].strip()):
        raise InvalidRequestError("task_options.query", "score needs a query string, e.g. --query 'what is a panda?'")
    try:
        check_truncation(common.get("truncate"), common.get("truncation_side", "right"))
    except InvalidRequestError as e:
        raise InvalidRequestError(f"task_options.{e.field}", e.reason) from None
    return common, opts


def check_job(spec: JobSpec) -> None:
    """Everything about a job that can be checked without the data or a model."""
    split_task_options(spec)
    engine_kwargs(spec)


class EngineProcessor:
    """Runs one job's task on an :class:`~prefillonly.LLM` over a batch of rows.

    Rows that fail (empty text, unusable image, too long without ``truncate``)
    come back as their error message; the job writes them to its errors file.
    """

    def __init__(self, llm, spec: JobSpec) -> None:
        self.llm = llm
        self.task = spec.task
        self.common, self.opts = split_task_options(spec)

    def prepare(self, requests: list[dict[str, Any]]) -> TokenCache | None:
        """Tokenise a batch's prompts in batched tokenizer calls, ahead of its engine call.

        The job runner calls this in its reader thread while the engine runs the
        previous batch, so tokenisation (Rust, all cores, GIL released) is off the
        GPU's critical path. Only where the prompt text is known without the model's
        help: not for score (its template is built per document) nor embedding
        instructions (their prefix is the LLM's business), nor vision-language
        models; those tokenise in the engine call, still in batches.
        """
        if self.llm.mm is not None or self.task == "score":
            return None
        if self.task == "embed" and (self.opts.get("instruction") is not None or self.opts.get("prompt_name") is not None):
            return None
        return self.llm.encoder.pretokenize(_prompts(requests))

    def __call__(self, requests: list[dict[str, Any]], prepared: TokenCache | None = None) -> list[dict[str, Any] | str]:
        prompts = _prompts(requests)
        kwargs: dict[str, Any] = dict(self.common, use_tqdm=False)
        if any("images" in r for r in requests):
            kwargs["images"] = [[i for i in r.get("images", []) if i is not None] or None for r in requests]
        before = self.llm.runner.tokens_processed
        with self.llm.encoder.using(prepared):
            results = self._run(prompts, kwargs)
        done = [r for r in results if r.error is None]
        share = (self.llm.runner.tokens_processed - before) // max(len(done), 1)
        out: list[dict[str, Any] | str] = []
        for r in results:
            if r.error is not None:
                out.append(_row_error(r.error))
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
            return llm.embed(prompts, **{k: o[k] for k in TASK_OPTIONS["embed"] if k in o}, **kwargs)
        return llm.next_token(prompts, top_k=o.get("top_k", 5), **kwargs)

    def _columns(self, r) -> dict[str, Any]:
        if self.task == "classify":
            return {"label": r.label, "probs": r.probs}
        if self.task == "score":
            return {"score": r.score}
        if self.task == "embed":
            return {"embedding": r.embedding.tolist()}
        top = [{"token_id": t.token_id, "token": t.token, "logprob": t.logprob} for t in r.top_logprobs]
        return {"token_id": r.token_id, "token": r.token, "logprob": r.logprob, "top_logprobs": top}


def _row_error(message: str) -> str:
    m = _BATCH_INDEX.match(message)
    if m is None:
        return message
    rest = message[m.end() :]
    return "messages" + rest if rest.startswith("[") else rest


def _prompts(requests: list[dict[str, Any]]) -> list[Any]:
    return [r["text"] if "text" in r else r["messages"] for r in requests]


def engine_kwargs(spec: JobSpec) -> dict[str, Any]:
    """LLM constructor arguments from the job's ``engine`` settings."""
    unknown = sorted(set(spec.engine) - set(_ENGINE_KEYS))
    if unknown:
        raise InvalidRequestError(f"engine.{unknown[0]}", f"unknown engine setting; known: {', '.join(_ENGINE_KEYS)}")
    return dict(spec.engine)
