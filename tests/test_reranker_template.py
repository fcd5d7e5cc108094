"""The Qwen3-Reranker prompt our score() feeds the model is token for token the one the
model card's reference code builds (tests/hf_reference.py: reranker_ids), with the real
Qwen3 tokenizer."""

from __future__ import annotations

import contextlib

import pytest

from tiny_models import NO_ID, YES_ID
from hf_reference import RERANK_DEFAULT_TASK, RERANK_PREFIX, RERANK_SUFFIX, reranker_ids

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


def _pieces(tok, query, doc, instruction=None):
    """(everything before the document, the document, the assistant tail) as token ids, each built
    on its own: the Qwen pre-tokeniser splits "<Document>:" from " <doc>", so they concatenate to
    the model card's ids (checked in the test below)."""
    instruction = instruction or RERANK_DEFAULT_TASK
    head = tok.encode(RERANK_PREFIX, add_special_tokens=False)
    head += tok.encode(f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>:", add_special_tokens=False)
    return head, tok.encode(" " + doc, add_special_tokens=False), tok.encode(RERANK_SUFFIX, add_special_tokens=False)


def test_pieces_are_the_model_cards_ids(qwen_tokenizer):
    for doc in [*DOCS, LONG_DOC]:
        head, body, tail = _pieces(qwen_tokenizer, QUERY, doc)
        assert head + body + tail == reranker_ids(qwen_tokenizer, QUERY, doc)
    head, body, tail = _pieces(qwen_tokenizer, QUERY, LONG_DOC)
    assert (len(head), len(body), len(tail)) == (69, 950, 9)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("n", [79, 100, 400])
def test_truncate_cuts_only_the_document(side, n, tiny_llm, qwen_tokenizer):
    """truncate=N: the whole prompt is N tokens; the system prompt, instruction, query and the
    assistant tail stay whole and only the document loses tokens, from the chosen side."""
    llm = tiny_llm("qwen3_tied")  # max_model_len 512
    head, doc, tail = _pieces(qwen_tokenizer, QUERY, LONG_DOC)
    keep = n - len(head) - len(tail)
    kept = doc[:keep] if side == "right" else doc[-keep:]
    (seen,) = _ids_fed(llm, QUERY, LONG_DOC, truncate=n, truncation_side=side)
    assert seen == head + kept + tail and len(seen) == n
    text = qwen_tokenizer.decode(seen)
    before = RERANK_PREFIX + f"<Instruct>: {RERANK_DEFAULT_TASK}\n<Query>: {QUERY}\n<Document>:"
    assert text.startswith(before) and text.endswith(RERANK_SUFFIX)
    kept_text = text[len(before) : -len(RERANK_SUFFIX)]
    assert 0 < len(kept_text) < len(LONG_DOC) / 2
    if side == "right":  # the model card's own truncation cuts the end of the document too
        assert (" " + LONG_DOC).startswith(kept_text)
        assert seen == reranker_ids(qwen_tokenizer, QUERY, LONG_DOC, max_length=n)
    else:
        assert LONG_DOC.endswith(kept_text) and not kept_text.startswith(" Sentence number 0 ")


def test_truncate_leaves_short_documents_and_long_instructions_alone(tiny_llm, qwen_tokenizer):
    llm = tiny_llm("qwen3_tied")
    instruction = "Given a question about Chinese geography, retrieve passages that answer it " * 3
    n = 120
    seen = _ids_fed(llm, QUERY, [LONG_DOC, DOCS[0]], instruction=instruction, truncate=n, truncation_side="left")
    head, doc, tail = _pieces(qwen_tokenizer, QUERY, LONG_DOC, instruction)
    short = reranker_ids(qwen_tokenizer, QUERY, DOCS[0], instruction)
    assert len(head) == 92 and len(short) < n
    assert sorted(seen) == sorted([head + doc[len(head) + len(tail) - n :] + tail, short])


def test_truncate_below_the_document_less_prompt_is_an_error(tiny_llm, qwen_tokenizer):
    from prefillonly import InvalidRequestError

    llm = tiny_llm("qwen3_tied")
    head, doc, tail = _pieces(qwen_tokenizer, QUERY, LONG_DOC)
    fixed = len(head) + len(tail)  # 78
    (seen,) = _ids_fed(llm, QUERY, LONG_DOC, truncate=fixed + 1)  # room for one document token
    assert seen == head + doc[:1] + tail
    with pytest.raises(InvalidRequestError) as e:
        llm.score(QUERY, LONG_DOC, truncate=fixed)
    assert e.value.field == "documents"
    assert str(e.value) == (f"documents: truncate={fixed} leaves no room for the document: the rest of the prompt "
                            f"(template, instruction, query, images) takes {fixed} tokens; pass truncate > {fixed}")
    results = llm.score(QUERY, [DOCS[0], LONG_DOC], truncate=fixed)  # in a list: each item reports it
    assert all(r.score is None and r.error.startswith(f"documents[{i}]: truncate={fixed} leaves no room")
               for i, r in enumerate(results))
    ranked = llm.rerank(QUERY, [DOCS[0], LONG_DOC], truncate=fixed)
    assert [r.error.split(":")[0] for r in ranked] == ["documents[0]", "documents[1]"]


def test_document_less_prompt_over_max_model_len(tiny_path, qwen_tokenizer):
    from prefillonly import LLM, PromptTooLongError

    llm = LLM(tiny_path("qwen3_tied"), dtype="float32", max_model_len=60, use_tqdm=False)
    for truncate in (None, 50, 1000):
        with pytest.raises(PromptTooLongError) as e:
            llm.score(QUERY, DOCS[0], truncate=truncate)
        assert str(e.value) == ("documents: no room for the document within max_model_len=60: the rest of the prompt "
                                "(template, instruction, query, images) takes 78 tokens; shorten the query or "
                                "instruction, or raise max_model_len")
