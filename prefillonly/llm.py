"""The offline API: load a checkpoint once, then run prefill-only tasks over many inputs."""

from __future__ import annotations

import os
from typing import Any, Literal

import torch

from .engine import ModelRunner, Pooling
from .engine.loader import load_model, read_checkpoint
from .errors import CheckpointError, InvalidRequestError, PrefillOnlyError
from .outputs import ClassifyResult, EmbedResult, NextTokenResult, RerankResult, ScoreResult
from .prompts import PromptEncoder, as_batch, check_str_list, check_truncation
from .tasks import ClassifyTask, EmbedTask, NextTokenTask, ScoreTask, Task, tokenize_labels
from .tasks.embed import pooling_from_checkpoint, prompts_from_checkpoint

DTypeLike = str | torch.dtype | None
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _resolve_dtype(dtype: DTypeLike, config: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(found, torch.dtype):
            return found
        return _DTYPES.get(str(found), torch.float32)
    if dtype not in _DTYPES:
        raise InvalidRequestError("dtype", f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


class LLM:
    """A model loaded for prefill-only work: no KV cache, packed steps, typed results.

    Every task method takes one item or a list. For a list, an item that cannot
    be run (empty, too long, unusable) gets a result with ``error`` set and the
    others are answered; for a single item the typed error is raised.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        dtype: DTypeLike = "auto",
        device: str | torch.device | None = None,
        max_num_batched_tokens: int = 16384,
        max_model_len: int | None = None,
        use_tqdm: bool = True,
    ) -> None:
        if not isinstance(max_num_batched_tokens, int) or max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_batched_tokens", f"must be a positive int; got {max_num_batched_tokens!r}")
        ckpt = read_checkpoint(model)
        self.path = ckpt.path
        self.config = ckpt.config
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = _resolve_dtype(dtype, ckpt.config)
        self.tokenizer = self._load_tokenizer(ckpt.path)
        self.model = load_model(ckpt, self.dtype, self.device)
        spec = self.model.spec
        self.max_model_len = max_model_len or spec.max_position_embeddings
        self.runner = ModelRunner(self.model, self.device, max_num_batched_tokens)
        self.encoder = PromptEncoder(self.tokenizer, self.max_model_len, spec.vocab_size)
        self.use_tqdm = use_tqdm

    @staticmethod
    def _load_tokenizer(path):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise CheckpointError(f"model: could not load the tokenizer from {path} ({e})") from None

    # -- tasks -------------------------------------------------------------------------------

    def next_token(self, prompts, top_k: int = 5, *, truncate: int | None = None,
                   truncation_side: Literal["left", "right"] = "right", use_tqdm: bool | None = None):
        """The most likely next token of each prompt, its logprob and the ``top_k`` alternatives."""
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= self.model.spec.vocab_size:
            raise InvalidRequestError("top_k", f"must be an int in [1, vocab size]; got {top_k!r}")
        check_truncation(truncate, truncation_side)
        self._need_lm_head("next_token")
        task = NextTokenTask(self.tokenizer, top_k, truncate, truncation_side)
        return self._run(task, prompts, "prompts", use_tqdm)

    def classify(self, prompts, labels: list[str] | None = None, *, truncate: int | None = None,
                 truncation_side: Literal["left", "right"] = "right", use_tqdm: bool | None = None):
        """Probability of each label as the answer, normalised over the labels."""
        check_truncation(truncate, truncation_side)
        if self.model.score is not None:
            own = self._own_labels()
            if labels is not None and list(labels) != own:
                raise InvalidRequestError("labels", f"this checkpoint has a classification head with labels {own}; omit labels")
            task = ClassifyTask(own, None, truncate, truncation_side, use_score_head=True)
        else:
            if labels is None:
                raise InvalidRequestError("labels", "this model has no classification head; pass labels=[...]")
            labels = check_str_list(labels, "labels")
            self._need_lm_head("classify")
            task = ClassifyTask(labels, tokenize_labels(self.tokenizer, labels), truncate, truncation_side, False)
        return self._run(task, prompts, "prompts", use_tqdm)

    def score(self, query: str, documents, *, instruction: str | None = None, truncate: int | None = None,
              truncation_side: Literal["left", "right"] = "right", use_tqdm: bool | None = None):
        """Relevance of each document to ``query`` in [0, 1] (Qwen3-Reranker semantics)."""
        task = self._score_task(query, instruction, truncate, truncation_side)
        return self._run(task, documents, "documents", use_tqdm)

    def rerank(self, query: str, documents, *, top_n: int | None = None, instruction: str | None = None,
               truncate: int | None = None, truncation_side: Literal["left", "right"] = "right",
               use_tqdm: bool | None = None) -> list[RerankResult]:
        """Documents ordered best first, as (index, score); failed documents come last."""
        if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0):
            raise InvalidRequestError("top_n", f"must be a non-negative int or None; got {top_n!r}")
        docs = check_str_list(documents, "documents") if not isinstance(documents, str) else [documents]
        scores = self.score(query, docs, instruction=instruction, truncate=truncate,
                            truncation_side=truncation_side, use_tqdm=use_tqdm)
        ranked = [RerankResult(i, s.score, docs[i], s.error) for i, s in enumerate(scores)]
        ranked.sort(key=lambda r: (r.score is None, -(r.score or 0.0)))
        return ranked[:top_n] if top_n else ranked

    def embed(self, texts, *, dimensions: int | None = None, normalize: bool = True,
              instruction: str | None = None, prompt_name: str | None = None,
              pooling: Literal["last", "mean", "cls"] | None = None, truncate: int | None = None,
              truncation_side: Literal["left", "right"] = "right", use_tqdm: bool | None = None):
        """One vector per text. ``instruction`` formats a query as Qwen3-Embedding expects."""
        check_truncation(truncate, truncation_side)
        hidden = self.model.spec.hidden_size
        if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 1 <= dimensions <= hidden):
            raise InvalidRequestError("dimensions", f"must be an int in [1, {hidden}]; got {dimensions!r}")
        if pooling is None:
            mode = pooling_from_checkpoint(self.path)
        else:
            try:
                mode = Pooling(pooling)
            except ValueError:
                raise InvalidRequestError("pooling", f"must be 'last', 'mean' or 'cls'; got {pooling!r}") from None
        prefix = ""
        if instruction is not None and prompt_name is not None:
            raise InvalidRequestError("instruction", "pass either instruction or prompt_name, not both")
        if instruction is not None:
            if not isinstance(instruction, str):
                raise InvalidRequestError("instruction", f"expected a string; got {type(instruction).__name__}")
            prefix = f"Instruct: {instruction}\nQuery:"
        elif prompt_name is not None:
            prompts = prompts_from_checkpoint(self.path)
            if prompt_name not in prompts:
                raise InvalidRequestError("prompt_name", f"{prompt_name!r} is not among this model's prompts {sorted(prompts)}")
            prefix = prompts[prompt_name]
        task = EmbedTask(mode, prefix, dimensions, bool(normalize), truncate, truncation_side)
        return self._run(task, texts, "texts", use_tqdm)

    # -- plumbing ---------------------------------------------------------------------------

    def _score_task(self, query, instruction, truncate, side) -> ScoreTask:
        if not isinstance(query, str) or not query.strip():
            raise InvalidRequestError("query", "must be a non-empty string")
        if instruction is not None and not isinstance(instruction, str):
            raise InvalidRequestError("instruction", f"expected a string; got {type(instruction).__name__}")
        check_truncation(truncate, side)
        use_head = self.model.score is not None
        if use_head and self.model.spec.num_labels != 1:
            raise InvalidRequestError("model", "score() needs a one-label classification head; use classify()")
        if not use_head:
            self._need_lm_head("score")
        return ScoreTask(self.tokenizer, query, instruction, truncate, side, use_head)

    def _own_labels(self) -> list[str]:
        n = self.model.spec.num_labels
        id2label = getattr(self.config, "id2label", None) or {}
        return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]

    def _need_lm_head(self, what: str) -> None:
        if self.model.lm_head is None:
            raise InvalidRequestError("model", f"{what}() needs an LM head and this checkpoint has none; use embed()")

    def _run(self, task: Task, inputs: Any, field: str, use_tqdm: bool | None):
        items, single = as_batch(inputs, field)
        per_item: list[list] = []
        errors: dict[int, PrefillOnlyError] = {}
        for i, item in enumerate(items):
            name = field if single else f"{field}[{i}]"
            try:
                per_item.append(task.sequences(item, name, self.encoder))
            except InvalidRequestError as e:
                if single:
                    raise
                errors[i] = e
                per_item.append([])
        flat = [s for seqs in per_item for s in seqs]
        show = self.use_tqdm if use_tqdm is None else use_tqdm
        outputs = self.runner.run(flat, task.head, use_tqdm=show, desc=task.name)
        results, k = [], 0
        for i, (item, seqs) in enumerate(zip(items, per_item)):
            outs = outputs[k : k + len(seqs)]
            k += len(seqs)
            failure = errors.get(i) or next((o for o in outs if isinstance(o, Exception)), None)
            if failure is not None:
                if single:
                    raise failure
                results.append(task.failed(item, str(failure)))
            else:
                results.append(task.result(item, outs))
        return results[0] if single else results
