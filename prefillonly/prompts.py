"""Turn what users pass (text, token ids, chat messages) into checked token ids."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field as dc_field
from typing import Any, Literal, Sequence as Seq

from .errors import InvalidRequestError, PromptTooLongError

Prompt = str | list[int] | list[dict[str, Any]]
TruncationSide = Literal["left", "right"]

#: Texts per batched tokenizer call: big enough to keep every core busy, small enough
#: that one call's intermediate Python objects stay modest.
TOKENIZE_CHUNK = 2048


@dataclass
class TokenCache:
    """Token ids computed ahead of time by batched tokenizer calls.

    ``PromptEncoder.encode`` reads ids from the active cache (see
    :meth:`PromptEncoder.using`) instead of tokenising one text at a time; a text
    that is not in it is tokenised as before, so a cache can only save time,
    never change ids. Texts are keyed by ``(text, add_special_tokens)``, chat
    prompts by the identity of their message list (rendering is skipped too).
    """

    texts: dict[tuple[str, bool], list[int]] = dc_field(default_factory=dict)
    chats: dict[int, tuple[list[dict[str, Any]], list[int]]] = dc_field(default_factory=dict)
    parent: TokenCache | None = None

    def text(self, text: str, add_special_tokens: bool) -> list[int] | None:
        key = (text, add_special_tokens)
        cache: TokenCache | None = self
        while cache is not None:
            ids = cache.texts.get(key)
            if ids is not None:
                return ids
            cache = cache.parent
        return None

    def chat(self, messages: list[dict[str, Any]]) -> list[int] | None:
        cache: TokenCache | None = self
        while cache is not None:
            hit = cache.chats.get(id(messages))
            if hit is not None and hit[0] is messages:  # the same list object, not a recycled id
                return hit[1]
            cache = cache.parent
        return None

    def __len__(self) -> int:
        return len(self.texts) + len(self.chats)


#: The cache ``encode`` reads; a context variable, so that a thread preparing the next
#: batch never sees (or disturbs) the cache of the call running on the engine's thread.
_ACTIVE: ContextVar[TokenCache | None] = ContextVar("prefillonly_token_cache", default=None)


def is_chat(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def is_role_chat(value: Any) -> bool:
    """A chat whose every message has a role: what a multimodal prompt treats as one chat, not a batch of dicts."""
    return is_chat(value) and all("role" in m for m in value)


#: The roles the supported chat templates render. Qwen3's template silently drops any other
#: role (an OpenAI "developer" message, a typo), so the prompt would be wrong without an error.
CHAT_ROLES = ("system", "user", "assistant", "tool")


def check_chat(messages: Seq[Any], field: str, parts: bool = False) -> None:
    """Refuse a malformed chat before rendering, naming the message and key (``prompts[3][1].role``).

    A chat template does not complain about an unknown role or non-string
    content: it leaves the message out or renders it empty. ``parts`` says
    whether ``content`` may be a list of content parts (vision-language models;
    the parts themselves are checked where they are rendered).
    """
    for j, message in enumerate(messages):
        where = f"{field}[{j}]"
        if not isinstance(message, dict):
            raise InvalidRequestError(
                where, f"a chat message must be a dict with 'role' and 'content'; got {type(message).__name__}"
            )
        _check_role(message, where)
        _check_content(message, where, parts)


def _check_role(message: dict[str, Any], where: str) -> None:
    roles = ", ".join(map(repr, CHAT_ROLES))
    if "role" not in message:
        raise InvalidRequestError(f"{where}.role", f"is missing; give every message a role, one of {roles}")
    role = message["role"]
    if not isinstance(role, str) or role not in CHAT_ROLES:
        raise InvalidRequestError(f"{where}.role", f"must be one of {roles}; got {role!r}")


def _check_content(message: dict[str, Any], where: str, parts: bool) -> None:
    expected = "a string or a list of content parts" if parts else "a string"
    if "content" not in message:
        raise InvalidRequestError(f"{where}.content", f"is missing; give every message a content, {expected}")
    content = message["content"]
    if isinstance(content, str) or (parts and isinstance(content, list)):
        return
    hint = "" if parts or not isinstance(content, list) else " (content parts need a vision-language model)"
    raise InvalidRequestError(f"{where}.content", f"must be {expected}; got {type(content).__name__}{hint}")


def is_token_ids(value: Any) -> bool:
    if not isinstance(value, list) or len(value) == 0:
        return False
    if set(map(type, value)) == {int}:  # the common case, checked at C speed
        return True
    return all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def as_batch(prompts: Any, field: str) -> tuple[list[Any], bool]:
    """(items, was_single). One prompt is a str, a list of ids, or one chat."""
    return batch_of(prompts, field, _is_one_prompt, "a string, a list of token ids, chat messages, or a list of these")


def _is_one_prompt(value: Any) -> bool:
    return isinstance(value, str) or is_token_ids(value) or is_chat(value)


def batch_of(value: Any, field: str, is_one: Callable[[Any], bool], expected: str) -> tuple[list[Any], bool]:
    """(items, was_single): ``[value]`` when ``is_one(value)``, else the items of a non-empty list or tuple.

    Shared by the text and the multimodal paths, which differ only in what one item is.
    """
    if is_one(value):
        return [value], True
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise InvalidRequestError(field, "got an empty list; pass at least one item")
        return list(value), False
    raise InvalidRequestError(field, f"expected {expected}; got {type(value).__name__}")


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
            cache = _ACTIVE.get()
            ids = cache.text(prompt, add_special_tokens) if cache is not None else None
            if ids is None:
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
        check_chat(messages, field)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequestError(field, "this model's tokenizer has no chat template; pass plain text or token ids")
        cache = _ACTIVE.get()
        ids = cache.chat(messages) if cache is not None else None
        if ids is not None:
            return ids
        return self.tokenizer.encode(self._chat_text(messages), add_special_tokens=False)

    def _chat_text(self, messages: list[dict[str, Any]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    # -- batched tokenisation ------------------------------------------------------------------

    def encode_texts(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of many texts, identical to ``tokenizer.encode`` on each.

        One call of a fast tokenizer on a list runs in Rust on all cores with the
        GIL released, so it is several times faster than a loop of ``encode`` and
        can overlap the engine's work when run in another thread.
        """
        out: list[list[int]] = []
        for i in range(0, len(texts), TOKENIZE_CHUNK):
            enc = self.tokenizer(texts[i : i + TOKENIZE_CHUNK], add_special_tokens=add_special_tokens,
                                 return_attention_mask=False, return_token_type_ids=False)
            out.extend(enc["input_ids"])
        return out

    def pretokenize(self, prompts: Iterable[Any], prefix: str = "", add_special_tokens: bool = True) -> TokenCache:
        """Tokenise the texts and chats among ``prompts`` in batches, for :meth:`using`.

        ``prefix`` is what the task puts before a text item (an embedding
        instruction). Items that ``encode`` would refuse before tokenising
        (empty text, malformed chats) are left out, so their errors stay
        per item; texts already in the active cache are not tokenised again.
        """
        active = _ACTIVE.get()
        cache = TokenCache()
        keys: list[str] = []
        seen: set[str] = set()
        chats: list[list[dict[str, Any]]] = []
        chat_texts: list[str] = []
        for p in prompts:
            if isinstance(p, str):
                if not p.strip():
                    continue
                text = prefix + p
                if text in seen or (active is not None and active.text(text, add_special_tokens) is not None):
                    continue
                seen.add(text)
                keys.append(text)
            elif is_chat(p) and self._chat_ok(p) and (active is None or active.chat(p) is None):
                try:
                    chat_texts.append(self._chat_text(p))
                except Exception:  # noqa: BLE001 - rendered again by encode, which reports it for this item
                    continue
                chats.append(p)
        try:
            if keys:
                ids = self.encode_texts(keys, add_special_tokens)
                cache.texts = {(k, add_special_tokens): t for k, t in zip(keys, ids)}
            if chats:
                ids = self.encode_texts(chat_texts, add_special_tokens=False)
                cache.chats = {id(m): (m, t) for m, t in zip(chats, ids)}
        except Exception:  # noqa: BLE001 - one odd text fails the batch; encode, per item, behaves as always
            pass
        return cache

    def _chat_ok(self, messages: list[dict[str, Any]]) -> bool:
        """Whether ``render_chat`` would render ``messages``; the others are left to it, to fail per item."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            return False
        try:
            check_chat(messages, "")
        except InvalidRequestError:
            return False
        return True

    @contextmanager
    def using(self, cache: TokenCache | None) -> Iterator[None]:
        """Make ``encode`` read ``cache`` (on top of any cache already active) in this context."""
        if cache is None or not cache:
            yield
            return
        token = _ACTIVE.set(TokenCache(cache.texts, cache.chats, parent=_ACTIVE.get()))
        try:
            yield
        finally:
            _ACTIVE.reset(token)

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
