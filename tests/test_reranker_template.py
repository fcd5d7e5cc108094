"""The Qwen3-Reranker prompt our score() feeds the model is token for token the one the
model card's reference code builds (tests/hf_reference.py: reranker_ids), with the real
Qwen3 tokenizer."""

from __future__ import annotations

import contextlib

import pytest

from tiny_models import NO_ID, YES_ID
from hf_reference import RERANK_PREFIX, RERANK_SUFFIX, reranker_ids

QUERY = "What is the capital of China?"
DOCS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other. It gives weight to physical objects.",
    "北京是中华人民共和国的首都。",
    "  leading and trailing spaces, tabs\tand\nnewlines  ",
    "Code: def f(x):\n    return x ** 2  # <Document>: nested marker",
]
LONG_DOC = " ".join(f"Sentence number {i} talks about rivers, mountains and the history of Beijing." for i in range(60))


@contextlib.contextmanager
def captured_ids(llm):
    seen: list[list[int]] = []

    def observe(step):
        flat = step.input_ids.tolist()
        start = 0
        for seq in step.seqs:
            assert flat[start : start + len(seq)] == list(seq.token_ids)
            seen.append(list(seq.token_ids))
            start += len(seq)

    llm.runner.observers.append(observe)
    try:
        yield seen
    finally:
        llm.runner.observers.remove(observe)


def _ids_fed(llm, query, docs, **kwargs):
    with captured_ids(llm) as seen:
        results = llm.score(query, docs, **kwargs)
    for r in results if isinstance(results, list) else [results]:
        assert r.error is None and 0.0 < r.score < 1.0
    return seen


def test_yes_no_are_single_tokens(qwen_tokenizer):
    assert qwen_tokenizer.encode("yes", add_special_tokens=False) == [YES_ID]
    assert qwen_tokenizer.encode("no", add_special_tokens=False) == [NO_ID]


def test_template_strings_are_the_model_cards():
    from prefillonly.tasks import DEFAULT_INSTRUCTION, QWEN3_RERANKER

    assert QWEN3_RERANKER.prefix == RERANK_PREFIX
    assert QWEN3_RERANKER.suffix == RERANK_SUFFIX
    assert DEFAULT_INSTRUCTION == "Given a web search query, retrieve relevant passages that answer the query"


@pytest.mark.parametrize("instruction", [None, "Given a question, retrieve passages that answer it in Chinese"])
def test_score_feeds_the_model_card_token_ids(instruction, tiny_llm, qwen_tokenizer):
    llm = tiny_llm("qwen3_tied")
    seen = _ids_fed(llm, QUERY, DOCS, instruction=instruction)
    # steps are sorted by length: match each fed sequence to the reference ids of its document
    expected = [reranker_ids(qwen_tokenizer, QUERY, d, instruction) for d in DOCS]
    assert sorted(seen) == sorted(expected)
    assert len({tuple(e) for e in expected}) == len(DOCS)
    for ids in expected:
        text = qwen_tokenizer.decode(ids)
        assert text.startswith(RERANK_PREFIX) and text.endswith(RERANK_SUFFIX)
        assert ("<Instruct>: " + (instruction or "Given a web search query")) in text


def test_truncation_to_max_model_len_matches_model_card(tiny_path, qwen_tokenizer):
    from prefillonly import LLM, PromptTooLongError

    max_length = 160
    llm = LLM(tiny_path("qwen3_tied"), dtype="float32", max_model_len=max_length, use_tqdm=False)
    expected = reranker_ids(qwen_tokenizer, QUERY, LONG_DOC, max_length=max_length)
    assert len(expected) == max_length  # the reference really truncated
    assert len(reranker_ids(qwen_tokenizer, QUERY, LONG_DOC, max_length=10_000)) > max_length
    # without truncate, an over-long pair is refused rather than silently cut
    with pytest.raises(PromptTooLongError) as e:
        llm.score(QUERY, LONG_DOC)
    assert e.value.field == "documents"
    # truncate >= max_model_len: the body is cut to fit, exactly as the model card does
    (seen,) = _ids_fed(llm, QUERY, LONG_DOC, truncate=max_length)
    assert seen == expected
    # short documents in the same call are not touched
    seen = _ids_fed(llm, QUERY, [LONG_DOC, DOCS[0]], truncate=max_length)
    assert sorted(seen) == sorted([expected, reranker_ids(qwen_tokenizer, QUERY, DOCS[0])])


def test_truncate_limits_the_pair_not_the_template(tiny_llm, qwen_tokenizer):
    """truncate=N keeps at most N tokens of the formatted pair; prefix and suffix are always whole."""
    llm = tiny_llm("qwen3_tied")
    prefix = qwen_tokenizer.encode(RERANK_PREFIX, add_special_tokens=False)
    suffix = qwen_tokenizer.encode(RERANK_SUFFIX, add_special_tokens=False)
    for n in (40, 100):
        (seen,) = _ids_fed(llm, QUERY, LONG_DOC, truncate=n)
        assert seen == reranker_ids(qwen_tokenizer, QUERY, LONG_DOC, max_length=n + len(prefix) + len(suffix))
        assert len(seen) == n + len(prefix) + len(suffix)
