"""Batched tokenisation (``PromptEncoder.pretokenize`` / ``using``) gives exactly the ids,
results and per-item errors of the one-text-at-a-time path, with the real Qwen3 tokenizer."""

from __future__ import annotations

import threading

import pytest

from prefillonly.errors import InvalidRequestError, PromptTooLongError
from prefillonly.prompts import PromptEncoder, TokenCache
from tiny_models import PROMPTS, QWEN_VOCAB

CHAT = [{"role": "system", "content": "You judge reviews."}, {"role": "user", "content": "Great film. Positive?"}]

MIXED = [
    *PROMPTS,
    "",  # empty: refused before tokenising
    "   \n\t",  # whitespace only
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
    "  leading and trailing spaces  ",
    "emoji 🤖🚀 and accents: café, naïve, Zürich",
    "word " * 700,  # longer than max_model_len below: refused without truncate
    [151643, 9693, 2152],  # token ids pass through
    [1, 2, QWEN_VOCAB + 5],  # out of the vocabulary
    CHAT,
    [{"role": "user"}],  # malformed chat: no content
    "The capital of France is",  # a duplicate
]


def _encoder(tokenizer) -> PromptEncoder:
    return PromptEncoder(tokenizer, max_model_len=512, vocab_size=QWEN_VOCAB)


def _outcome(enc: PromptEncoder, prompt, i: int, prefix: str = "", add_special_tokens: bool = True):
    """ids after ``fit`` or the error (type, field, message) of one item, like the tasks do it."""
    field = f"prompts[{i}]"
    try:
        item = prefix + prompt if isinstance(prompt, str) else prompt
        ids = enc.encode(item, field, add_special_tokens=add_special_tokens)
        return enc.fit(ids, field, None, "right")
    except (InvalidRequestError, PromptTooLongError) as e:
        return type(e).__name__, str(e)


@pytest.mark.parametrize("prefix", ["", "Instruct: find reviews\nQuery:"])
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_batched_ids_equal_per_text(qwen_tokenizer, prefix, add_special_tokens):
    enc = _encoder(qwen_tokenizer)
    expected = [_outcome(enc, p, i, prefix, add_special_tokens) for i, p in enumerate(MIXED)]
    cache = enc.pretokenize([p for p in MIXED], prefix=prefix, add_special_tokens=add_special_tokens)
    assert len(cache.texts) == len({prefix + p for p in MIXED if isinstance(p, str) and p.strip()})
    assert len(cache.chats) == 1  # the malformed chat is left to encode, which reports it
    with enc.using(cache):
        got = [_outcome(enc, p, i, prefix, add_special_tokens) for i, p in enumerate(MIXED)]
    assert got == expected
    kinds = [type(o[0]) if isinstance(o, tuple) else list for o in expected]
    # empty, whitespace (both only without a prefix: the task refuses them before prefixing), too long,
    # out of the vocabulary, malformed chat
    assert kinds.count(str) == (5 if not prefix else 3)


def test_cache_is_read_not_bypassed(qwen_tokenizer):
    """Inside ``using``, cached ids are what ``encode`` returns (the fast path is really taken)."""
    enc = _encoder(qwen_tokenizer)
    cache = TokenCache(texts={("hello", True): [7, 8, 9]})
    with enc.using(cache):
        assert enc.encode("hello", "p") == [7, 8, 9]
        assert enc.encode("hello", "p", add_special_tokens=False) == qwen_tokenizer.encode("hello", add_special_tokens=False)
    assert enc.encode("hello", "p") == qwen_tokenizer.encode("hello")


def test_nested_caches_and_threads(qwen_tokenizer):
    """An inner cache falls back to the outer one; another thread never sees this thread's cache."""
    enc = _encoder(qwen_tokenizer)
    outer = TokenCache(texts={("a", True): [1]})
    inner = enc.pretokenize(["a", "b"])  # "a" is not in the active cache yet: tokenised here
    assert ("a", True) in inner.texts
    seen: list = []
    with enc.using(outer):
        inner2 = enc.pretokenize(["a", "b"])
        assert ("a", True) not in inner2.texts and ("b", True) in inner2.texts
        with enc.using(inner2):
            assert enc.encode("a", "p") == [1]
            t = threading.Thread(target=lambda: seen.append(enc.encode("a", "p")))
            t.start()
            t.join()
    assert seen == [qwen_tokenizer.encode("a")]


@pytest.mark.parametrize("task", ["classify", "embed", "next_token"])
def test_llm_results_identical_to_per_text(tiny_llm, task, monkeypatch):
    """Whole calls on a mix of prompts: batched tokenisation changes neither results nor errors."""
    llm = tiny_llm("qwen3_untied", max_model_len=256)
    prompts = list(MIXED)

    def call():
        if task == "classify":
            return [(r.error, r.probs) for r in llm.classify(prompts, labels=["yes", "no"])]
        if task == "embed":
            return [(r.error, None if r.error else r.embedding.tolist())
                    for r in llm.embed(prompts, instruction="find reviews", normalize=True)]
        return [(r.error, r.token_id) for r in llm.next_token(prompts, top_k=2)]

    encoded: list[str] = []
    real_encode = llm.tokenizer.encode
    monkeypatch.setattr(llm.tokenizer, "encode", lambda text, **kw: encoded.append(text) or real_encode(text, **kw))
    batched = call()
    texts = [p for p in prompts if isinstance(p, str) and p.strip()]
    assert not [t for t in encoded if any(t.endswith(p) for p in texts)]  # no prompt was tokenised on its own
    monkeypatch.undo()
    calls: list[int] = []
    real = PromptEncoder.pretokenize

    def no_batches(self, items, prefix="", add_special_tokens=True):
        calls.append(1)
        return TokenCache()

    monkeypatch.setattr(PromptEncoder, "pretokenize", no_batches)
    per_text = call()
    monkeypatch.setattr(PromptEncoder, "pretokenize", real)
    assert calls == [1]
    assert len(batched) == len(per_text)
    for (err_b, val_b), (err_p, val_p) in zip(batched, per_text):
        assert err_b == err_p
        assert val_b == pytest.approx(val_p, abs=1e-5) if val_p is not None else val_b is None
    assert sum(e is not None for e, _ in batched) == 5  # empty, whitespace, too long, out of vocab, malformed chat
