"""The offline API: load a checkpoint once, then run prefill-only tasks over many inputs."""

from __future__ import annotations

import gc
import os
import time
from typing import Any, Iterator, Literal

import torch
from tqdm.auto import tqdm

from .engine import ModelRunner, Pooling, Sequence
from .engine import runner as engine_runner
from .engine.accel import configure as configure_speed
from .engine.loader import load_model, read_checkpoint
from .errors import CheckpointError, InvalidRequestError, PrefillOnlyError
from .outputs import RerankResult
from .prompts import PromptEncoder, TokenCache, as_batch, check_str_list, check_truncation
from .tasks import ClassifyTask, EmbedTask, NextTokenTask, ScoreTask, Task, tokenize_labels
from .tasks.embed import pooling_from_checkpoint, prompts_from_checkpoint

DTypeLike = str | torch.dtype | None
# Image models check a long call in windows too (the first the size of the runner's small first step): the GPU
# starts on the first few images while the rest are rendered. False: the whole call is checked first.
STREAM_IMAGES = True
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _resolve_dtype(dtype: DTypeLike, config: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise InvalidRequestError("dtype", f"{dtype} is not a supported weight dtype; use float32, float16 or bfloat16")
        return dtype
    if dtype is None or dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if found is None and hasattr(config, "get_text_config"):  # VL configs may set it on text_config only
            text = config.get_text_config()
            found = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
        if isinstance(found, torch.dtype):
            return found
        return _DTYPES.get(str(found), torch.float32)
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise InvalidRequestError("dtype", f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


class LLM:
    """A model loaded for prefill-only work: no KV cache, packed steps, typed results.

    Every task method takes one item or a list. For a list, an item that cannot
    be run (empty, too long, unusable) gets a result with ``error`` set and the
    others are answered; for a single item the typed error is raised.

    Vision-language checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, jina-reranker-m0,
    LLaVA-NeXT) take images in chat content parts or through ``images=`` on
    every task method (see ``prefillonly.multimodal``). ``encoder_cache_bytes``
    bounds the LRU cache of vision-encoder outputs, keyed by image content
    (default 256 MiB, on the model's device, counting the deepstack features;
    0 turns it off). It is held on top of the step's activations, so the
    default is small: enough for the images of a few steps to be asked
    several questions.

    Speed options (each ``None`` = automatic; see ``engine.accel``):

    * ``fused_kernels``: fused Triton kernels for RMSNorm, q/k-norm + rotary and
      the gated activation, residual adds folded into the GEMMs. Auto: on for
      CUDA float16/bfloat16 (needs Triton); never on CPU.
    * ``cuda_graphs``: replay captured CUDA graphs for small steps (under 512
      tokens), for low latency on single short requests. Auto: on for CUDA.
    * ``prefill_chunk_size``: hybrid prefilling; a prompt longer than this (it
      runs alone in its step) has its token-wise layer work (norms, projections,
      rotary, MLP) run in chunks of this many tokens, so activation memory stays
      bounded (a 32k-token prompt on Qwen3-0.6B: under 0.5 GiB). Auto: 8192 on
      CUDA, off on CPU; ``0`` turns it off.
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
        encoder_cache_bytes: int | None = None,
        fused_kernels: bool | None = None,
        cuda_graphs: bool | None = None,
        prefill_chunk_size: int | None = None,
    ) -> None:
        if not isinstance(max_num_batched_tokens, int) or max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_batched_tokens", f"must be a positive int; got {max_num_batched_tokens!r}")
        if max_model_len is not None and (not isinstance(max_model_len, int) or isinstance(max_model_len, bool)
                                          or max_model_len < 1):
            raise InvalidRequestError("max_model_len", f"must be a positive int or None; got {max_model_len!r}")
        ckpt = read_checkpoint(model)
        self.path = ckpt.path
        self.config = ckpt.config
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, ckpt.config)
        self.tokenizer = self._load_tokenizer(ckpt.path)
        self.model = load_model(ckpt, self.dtype, self.device)
        spec = self.model.spec
        self.max_model_len = max_model_len or spec.max_position_embeddings
        self.runner = ModelRunner(self.model, self.device, max_num_batched_tokens)
        self.runner.graphs = configure_speed(self.model, self.device, self.dtype, fused_kernels, cuda_graphs,
                                             prefill_chunk_size)
        self.encoder = PromptEncoder(self.tokenizer, self.max_model_len, spec.vocab_size)
        self.mm = None  # the multimodal prompt encoder of a vision-language checkpoint
        if ckpt.vision is not None:
            self._init_vision(encoder_cache_bytes)
        elif encoder_cache_bytes is not None:
            raise InvalidRequestError("encoder_cache_bytes", "this checkpoint has no vision tower")
        self.use_tqdm = use_tqdm

    def _init_vision(self, cache_bytes: int | None) -> None:
        from .models.vision import EncoderCache
        from .multimodal import MultimodalPromptEncoder

        info = self.model.info
        if cache_bytes is not None:
            if not isinstance(cache_bytes, int) or isinstance(cache_bytes, bool) or cache_bytes < 0:
                raise InvalidRequestError("encoder_cache_bytes", f"must be a non-negative int; got {cache_bytes!r}")
            self.model.encoder_cache = EncoderCache(cache_bytes)
        if info.kind == "llava_next":
            from .vision.llava_next_preprocess import LlavaNextImagePreprocessor as Proc
        else:
            from .vision.qwen_preprocess import QwenImagePreprocessor as Proc
        try:
            processor = Proc.from_pretrained(self.path)
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"model: preprocessor_config.json in {self.path} is not usable ({e})") from None
        self.mm = MultimodalPromptEncoder(self.tokenizer, self.max_model_len, self.model.spec.vocab_size, info, processor)
        self.encoder = self.mm

    @staticmethod
    def _load_tokenizer(path):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise CheckpointError(f"model: could not load the tokenizer from {path} ({e})") from None

    # -- tasks -------------------------------------------------------------------------------

    def next_token(self, prompts, top_k: int = 5, *, images=None, truncate: int | None = None,
                   truncation_side: Literal["left", "right"] = "right", use_tqdm: bool | None = None):
        """The most likely next token of each prompt, its logprob and the ``top_k`` alternatives.

        ``images`` (vision-language models): for one prompt an image or a list of
        images; for a list of prompts one entry (None, an image or a list) per prompt.
        """
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= self.model.spec.vocab_size:
            raise InvalidRequestError("top_k", f"must be an int in [1, {self.model.spec.vocab_size}] (the vocabulary size); got {top_k!r}")
        check_truncation(truncate, truncation_side)
        self._need_lm_head("next_token")
        task = NextTokenTask(self.tokenizer, top_k, truncate, truncation_side)
        return self._run(task, prompts, "prompts", use_tqdm, images)

    def classify(self, prompts, labels: list[str] | None = None, *, images=None, truncate: int | None = None,
                 truncation_side: Literal["left", "right"] = "right", use_tqdm: bool | None = None):
        """Probability of each label as the answer, normalised over the labels."""
        check_truncation(truncate, truncation_side)
        if self.model.score is not None:
            own = self._own_labels()
            if labels is not None and (not isinstance(labels, (list, tuple)) or list(labels) != own):
                raise InvalidRequestError("labels", f"this checkpoint has a classification head with labels {own}; omit labels")
            task = ClassifyTask(own, None, truncate, truncation_side, use_score_head=True)
        else:
            if labels is None:
                raise InvalidRequestError("labels", "this model has no classification head; pass labels=[...]")
            labels = check_str_list(labels, "labels")
            if len(labels) < 2:  # one label would be normalised to 1.0 (or, before, a sigmoid of a raw logit)
                raise InvalidRequestError("labels", "pass at least two labels; probabilities are normalised over them")
            self._need_lm_head("classify")
            task = ClassifyTask(labels, tokenize_labels(self.tokenizer, labels), truncate, truncation_side, False)
        return self._run(task, prompts, "prompts", use_tqdm, images)

    def score(self, query, documents, *, images=None, query_images=None, instruction: str | None = None,
              truncate: int | None = None, truncation_side: Literal["left", "right"] = "right",
              use_tqdm: bool | None = None):
        """Relevance of each document to ``query`` in [0, 1] (Qwen3-Reranker semantics).

        ``truncate=N`` cuts only the document (its end, or its start with
        ``truncation_side="left"``) so that the whole prompt is at most N tokens:
        the template, instruction and query are never cut, and an N too small for
        them fails the item with an error naming ``truncate``. A list of documents
        is always one item per element; a bad one fails alone.

        With a vision-language checkpoint the query and each document may be a
        string, an image, or ``{"text": ..., "image": ...}``; ``images`` adds
        images to the documents (one entry per document) and ``query_images``
        to the query. Qwen-VL checkpoints score like Qwen3-VL-Reranker,
        jina-reranker-m0 with its own head and prompt.
        """
        if self.mm is not None:
            return self._mm_score(query, documents, images, query_images, instruction, truncate, truncation_side, use_tqdm)
        if images is not None or query_images is not None:
            raise InvalidRequestError("images", "this model has no vision tower; it cannot take images")
        task = self._score_task(query, instruction, truncate, truncation_side)
        return self._run(task, _as_documents(documents, False), "documents", use_tqdm)

    def rerank(self, query, documents, *, top_n: int | None = None, images=None, query_images=None,
               instruction: str | None = None, truncate: int | None = None,
               truncation_side: Literal["left", "right"] = "right",
               use_tqdm: bool | None = None) -> list[RerankResult]:
        """Documents ordered best first, as (index, score); failed documents come last, with ``error``.

        ``top_n=None`` returns them all; ``top_n=0`` is refused rather than read as
        "all" (as some servers do) or as "none".
        """
        if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
            raise InvalidRequestError("top_n", f"must be a positive int, or None for all documents; got {top_n!r}")
        docs = _as_documents(documents, self.mm is not None)
        scores = self.score(query, docs, images=images, query_images=query_images, instruction=instruction,
                            truncate=truncate, truncation_side=truncation_side, use_tqdm=use_tqdm)
        if not isinstance(docs, tuple):  # one document: a bad one has raised, like any single item
            docs, scores = (docs,), [scores]
        ranked = [RerankResult(i, s.score, _doc_text(docs[i]), s.error) for i, s in enumerate(scores)]
        ranked.sort(key=lambda r: (r.score is None, -(r.score or 0.0)))
        return ranked if top_n is None else ranked[:top_n]

    def embed(self, texts, *, images=None, dimensions: int | None = None, normalize: bool = True,
              instruction: str | None = None, prompt_name: str | None = None,
              pooling: Literal["last", "mean", "cls"] | None = None, truncate: int | None = None,
              truncation_side: Literal["left", "right"] = "right", use_tqdm: bool | None = None):
        """One vector per text. ``instruction`` formats a query as Qwen3-Embedding expects.

        A vision-language checkpoint embeds like Qwen3-VL-Embedding: each item
        (a string, an image, ``{"text", "image"}`` or chat messages; ``images``
        adds images per item) is rendered with the chat template under a system
        turn holding ``instruction`` (default "Represent the user's input.").
        """
        check_truncation(truncate, truncation_side)
        hidden = self.model.spec.hidden_size
        if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 1 <= dimensions <= hidden):
            raise InvalidRequestError("dimensions", f"must be an int in [1, {hidden}] (the hidden size); got {dimensions!r}")
        if not isinstance(normalize, bool):  # normalize="no" would otherwise read as True
            raise InvalidRequestError("normalize", f"must be True or False; got {normalize!r}")
        if prompt_name is not None and not isinstance(prompt_name, str):
            raise InvalidRequestError("prompt_name", f"expected a string; got {type(prompt_name).__name__}")
        if pooling is None:
            mode = pooling_from_checkpoint(self.path)
        else:
            try:
                mode = Pooling(pooling)
            except (ValueError, TypeError):
                raise InvalidRequestError("pooling", f"must be 'last', 'mean' or 'cls'; got {pooling!r}") from None
        if self.mm is not None:
            return self._mm_embed(texts, images, mode, dimensions, normalize, instruction, prompt_name,
                                  truncate, truncation_side, use_tqdm)
        instruction, prefix = self._embed_prompt(instruction, prompt_name)
        if prefix is None:  # a checkpoint's prompt is used as it is; an instruction is formatted
            prefix = "" if instruction is None else f"Instruct: {instruction}\nQuery:"
        task = EmbedTask(mode, prefix, dimensions, bool(normalize), truncate, truncation_side)
        return self._run(task, texts, "texts", use_tqdm, images)

    # -- vision-language tasks ----------------------------------------------------------------

    def _mm_score(self, query, documents, images, query_images, instruction, truncate, side, use_tqdm):
        from .tasks.mm import MultimodalScoreTask

        if instruction is not None and not isinstance(instruction, str):
            raise InvalidRequestError("instruction", f"expected a string; got {type(instruction).__name__}")
        check_truncation(truncate, side)
        style = "jina" if self.model.info.score_head == "jina" else "qwen3_vl"
        if style != "jina":
            self._need_lm_head("score")
        if query_images is not None and not isinstance(query_images, (list, tuple)):
            query_images = [query_images]
        task = MultimodalScoreTask(self.mm, query, query_images, instruction, truncate, side, style)
        return self._run(task, _as_documents(documents, True), "documents", use_tqdm, images)

    def _mm_embed(self, texts, images, mode, dimensions, normalize, instruction, prompt_name, truncate, side, use_tqdm):
        from .tasks.mm import MultimodalEmbedTask

        instruction, named = self._embed_prompt(instruction, prompt_name)
        task = MultimodalEmbedTask(mode, instruction if named is None else named, dimensions, bool(normalize),
                                   truncate, side)
        return self._run(task, texts, "texts", use_tqdm, images)

    # -- plumbing ---------------------------------------------------------------------------

    def _embed_prompt(self, instruction: Any, prompt_name: str | None) -> tuple[str | None, str | None]:
        """(instruction, the checkpoint's prompt named ``prompt_name``), checked; at most one is not None.

        The text and the vision-language paths use them differently (a formatted
        prefix, a system turn) but must refuse the same mistakes.
        """
        if instruction is not None and prompt_name is not None:
            raise InvalidRequestError("instruction", "pass either instruction or prompt_name, not both")
        if instruction is not None and not isinstance(instruction, str):
            raise InvalidRequestError("instruction", f"expected a string; got {type(instruction).__name__}")
        if prompt_name is None:
            return instruction, None
        prompts = prompts_from_checkpoint(self.path)
        if prompt_name not in prompts:
            raise InvalidRequestError("prompt_name", f"{prompt_name!r} is not among this model's prompts {sorted(prompts)}")
        return None, prompts[prompt_name]

    def _score_task(self, query, instruction, truncate, side) -> ScoreTask:
        if not isinstance(query, str):
            raise InvalidRequestError("query", f"must be a non-empty string; got {type(query).__name__}")
        if not query.strip():
            raise InvalidRequestError("query", "is empty; pass non-empty text")
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

    def _run(self, task: Task, inputs: Any, field: str, use_tqdm: bool | None, images: Any = None):
        # Everything that exists before the call (the model, the tokenizer, whatever else the process holds)
        # is hidden from the cyclic collector for the call's duration: its full collections would otherwise
        # walk all of it on the thread that feeds the GPU. Afterwards it is collectable again (no leak).
        gc.freeze()
        try:
            return self._run_unfrozen(task, inputs, field, use_tqdm, images)
        finally:
            gc.unfreeze()

    def _run_unfrozen(self, task: Task, inputs: Any, field: str, use_tqdm: bool | None, images: Any = None):
        if self.mm is not None:
            try:
                return self._run_items(task, inputs, field, use_tqdm, images)
            finally:
                self.mm.reset()
        if images is not None:
            raise InvalidRequestError("images", "this model has no vision tower; it cannot take images")
        with self.encoder.using(self._pretokenize(task, inputs, field)):
            return self._run_items(task, inputs, field, use_tqdm, None)

    def _pretokenize(self, task: Task, inputs: Any, field: str) -> TokenCache | None:
        """A list's texts tokenised in batches on all cores, not one by one in ``_run_items``.

        Only for tasks that pass each text item (after a fixed prefix) to ``encoder.encode``;
        the ids are identical, a text missing from the cache is simply tokenised there.
        """
        if isinstance(task, EmbedTask):
            prefix = task.prefix
        elif isinstance(task, (ClassifyTask, NextTokenTask)):
            prefix = ""
        else:
            return None
        items, single = as_batch(inputs, field)
        return None if single else self.encoder.pretokenize(items, prefix)

    def _run_items(self, task: Task, inputs: Any, field: str, use_tqdm: bool | None, images: Any):
        """Check each item into sequences, run them, build each item's result (or its error).

        Items are checked lazily, window by window, as the runner asks for more
        (``ModelRunner.stream``), and an item's result is built as soon as all its
        sequences are back: on a long list the GPU starts early and the results
        are ready soon after its last step.
        """
        mm = self.mm
        per_images = None
        if mm is None:
            items, single = as_batch(inputs, field)
        else:
            from .multimodal import align_images, as_mm_batch

            items, single = as_mm_batch(inputs, field)
            per_images = align_images(images, len(items), single)
        show = self.use_tqdm if use_tqdm is None else use_tqdm
        bar = tqdm(total=len(items), desc=task.name, unit="req", disable=not show or len(items) < 2, leave=False)
        start, tokens0 = time.perf_counter(), self.runner.tokens_processed
        failures: dict[int, Exception] = {}
        outputs: list[list] = [[] for _ in items]
        slots: list[tuple[int, int]] = []  # each sequence's (item, place among the item's sequences), in arrival order
        left = [0] * len(items)
        results: list[Any] = [None] * len(items)

        def sequences(i: int) -> list[Sequence]:
            name = field if single else f"{field}[{i}]"
            try:
                if mm is None:
                    return task.sequences(items[i], name, self.encoder)
                mm.begin(per_images[i] if per_images is not None else None)
                return mm.finish(task.sequences(items[i], name, mm), name)
            except Exception as e:  # whatever the tokenizer or chat template raised fails this item only
                err = e if isinstance(e, PrefillOnlyError) else _unusable(name, e)
                if single and err is e:
                    raise
                if single:
                    raise err from e
                failures[i] = err
                return []

        def finish(i: int) -> None:
            failure = failures.get(i) or next((o for o in outputs[i] if isinstance(o, Exception)), None)
            if failure is not None:
                if single:
                    raise failure
                results[i] = task.failed(items[i], str(failure))
            else:
                results[i] = task.result(items[i], outputs[i])
            if show:
                bar.update(1)
                rate = (self.runner.tokens_processed - tokens0) / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(tok_s=f"{rate:,.0f}", refresh=False)

        def windows() -> Iterator[list[Sequence]]:
            # The GPU starts once a step's worth of items is checked, and later windows (four steps' worth) are
            # checked while it runs. Image models start on the runner's small first step, whose images' pixels
            # are ready soonest, then one step's worth, so each window is rendered while the last one runs.
            budget = self.runner.max_num_batched_tokens
            if mm is None:
                limits: list[float] = [budget]
            elif STREAM_IMAGES:
                limits = [max(1, budget // engine_runner.FIRST_STEP_FRACTION), budget]
            else:
                limits = [float("inf")]
            limit = limits.pop(0)
            window: list[Sequence] = []
            tokens = 0
            for i in range(len(items)):
                seqs = sequences(i)
                slots.extend((i, k) for k in range(len(seqs)))
                left[i] = len(seqs)
                outputs[i] = [None] * len(seqs)
                if not seqs:
                    finish(i)
                window.extend(seqs)
                tokens += sum(len(s) for s in seqs)
                if tokens >= limit:
                    yield window
                    window, tokens = [], 0
                    limit = limits.pop(0) if limits else 4 * budget
            yield window

        for j, out in self.runner.stream(windows(), task.head):
            i, k = slots[j]
            outputs[i][k] = out
            left[i] -= 1
            if left[i] == 0:
                finish(i)
        bar.close()
        return results[0] if single else results


def _doc_text(doc: Any) -> str | None:
    """What a rerank result echoes as its document: the text (None for an image-only document)."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("text"), str):
        return doc["text"]
    return None


def _as_documents(documents: Any, multimodal: bool) -> Any:
    """One document as is, or a list of documents as a tuple: every element is then its own
    document (a list of ints or of dicts is never read as one prompt), so a bad one fails alone."""
    if isinstance(documents, str):
        return documents
    if isinstance(documents, (list, tuple)):
        if not documents:
            raise InvalidRequestError("documents", "is empty; pass at least one")
        return tuple(documents)
    if multimodal:
        from .multimodal import is_image_source

        if is_image_source(documents) or isinstance(documents, dict):
            return documents
        kinds = "a string, an image, a {'text', 'image'} dict, or a list of these"
    else:
        kinds = "a string or a list of strings"
    raise InvalidRequestError("documents", f"expected {kinds}; got {type(documents).__name__}")


def _resolve_device(device: Any) -> torch.device:
    """The device asked for, checked here: torch's own errors for a typo or a missing GPU come from deep inside."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidRequestError("device", f"{device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidRequestError("device", f"{device!r}: no CUDA GPU is available on this machine")
        if dev.index is not None and dev.index >= count:
            raise InvalidRequestError("device", f"{device!r}: this machine has {count} CUDA GPU(s)")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise InvalidRequestError("device", f"{device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def _unusable(field: str, error: Exception) -> InvalidRequestError:
    """An unexpected failure while encoding one item, reported as that item's error."""
    return InvalidRequestError(field, f"could not be encoded ({type(error).__name__}: {error})")
