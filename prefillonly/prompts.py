"""Turn what users pass (text, token ids, chat messages) into checked token ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence as Seq

from .errors import InvalidRequestError, PromptTooLongError

Prompt = str | list[int] | list[dict[str, Any]]
TruncationSide = Literal["left", "right"]


def is_chat(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def is_token_ids(value: Any) -> bool:
    if not isinstance(value, list) or len(value) == 0:
        return False
    if set(map(type, value)) == {int}:  # the common case, checked at C speed
        return True
    return all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def as_batch(prompts: Any, field: str) -> tuple[list[Any], bool]:
    """(items, was_single). One prompt is a str, a list of ids, or one chat."""
    if isinstance(prompts, str) or is_token_ids(prompts) or is_chat(prompts):
        return [prompts], True
    if isinstance(prompts, (list, tuple)):
        if len(prompts) == 0:
            raise InvalidRequestError(field, "got an empty list; pass at least one item")
        return list(prompts), False
    raise InvalidRequestError(
        field, f"expected a string, a list of token ids, chat messages, or a list of these; got {type(prompts).__name__}"
    )


@dataclass
class PromptEncoder:
    """Tokenises and length-checks prompts for one model."""

    tokenizer: Any
    max_model_len: int
    vocab_size: int

    def encode(self, prompt: Any, field: str, add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidRequestError(field, "prompt is empty; pass non-empty text")
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        elif is_chat(prompt):
            ids = self.render_chat(prompt, field)
        elif is_token_ids(prompt):
            in_range = min(prompt) >= 0 and max(prompt) < self.vocab_size
            bad = [] if in_range else [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(field, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
            ids = list(prompt)
        elif isinstance(prompt, list) and not prompt:
            raise InvalidRequestError(field, "prompt is an empty list; pass text, token ids or chat messages")
        else:
            raise InvalidRequestError(
                field, f"expected a string, a list of token ids or a list of chat messages; got {type(prompt).__name__}"
            )
        if not ids:
            raise InvalidRequestError(field, "prompt tokenises to no tokens")
        return ids

    def render_chat(self, messages: list[dict[str, Any]], field: str) -> list[int]:
        for j, m in enumerate(messages):
            if "role" not in m or "content" not in m:
                raise InvalidRequestError(f"{field}[{j}]", "a chat message needs 'role' and 'content'")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequestError(field, "this model's tokenizer has no chat template; pass plain text or token ids")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def fit(
        self,
        ids: list[int],
        field: str,
        truncate: int | None,
        side: TruncationSide,
        reserved: int = 0,
    ) -> list[int]:
        """Apply explicit truncation; refuse over-long input without it.

        ``reserved`` tokens (a template's prefix and suffix) are added around
        ``ids`` later and are never cut.
        """
        limit = self.max_model_len - reserved
        if truncate is not None:
            limit = min(limit, truncate)
            if len(ids) > limit:
                ids = ids[:limit] if side == "right" else ids[len(ids) - limit :]
        if len(ids) + reserved > self.max_model_len:
            raise PromptTooLongError(
                field,
                f"{len(ids) + reserved} tokens exceed max_model_len={self.max_model_len}; "
                "pass truncate=N to cut it, or raise max_model_len",
            )
        if not ids:
            raise InvalidRequestError(field, "prompt is empty after truncation")
        return ids


def check_truncation(truncate: Any, side: Any) -> None:
    if truncate is not None and (not isinstance(truncate, int) or isinstance(truncate, bool) or truncate < 1):
        raise InvalidRequestError("truncate", f"must be a positive int or None; got {truncate!r}")
    if side not in ("left", "right"):
        raise InvalidRequestError("truncation_side", f"must be 'left' or 'right'; got {side!r}")


def check_str_list(values: Any, field: str, allow_empty_items: bool = False) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Seq) or isinstance(values, bytes):
        raise InvalidRequestError(field, f"expected a list of strings; got {type(values).__name__}")
    out = list(values)
    if not out:
        raise InvalidRequestError(field, "is empty; pass at least one")
    for j, v in enumerate(out):
        if not isinstance(v, str):
            raise InvalidRequestError(f"{field}[{j}]", f"expected a string; got {type(v).__name__}")
    return out
