"""score/rerank fail a bad document alone; every public method names the bad argument with a
typed error, never an exception from inside torch, jinja or the tokenizer."""

from __future__ import annotations

import pytest
import torch

from prefillonly import LLM, InvalidRequestError

QUERY = "What is the capital of China?"
GOOD = ["Beijing is the capital of China.", "Paris is in France.", "Bananas are yellow."]


@pytest.fixture(scope="module")
def llm(tiny_llm):
    return tiny_llm("qwen3_tied")


def _raises(field, call, *needles):
    with pytest.raises(InvalidRequestError) as info:
        call()
    assert info.value.field == field, str(info.value)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    return info.value


# -- score / rerank: one bad document fails alone ------------------------------------------------


def test_rerank_bad_documents_fail_alone(llm):
    docs = [GOOD[0], 7, "", None, ["a", "list"], "  \t", GOOD[1], {"text": "x"}, GOOD[2]]
    ranked = llm.rerank(QUERY, docs)
    assert sorted(r.index for r in ranked) == list(range(len(docs)))
    by_index = {r.index: r for r in ranked}
    errors = {i: r.error for i, r in by_index.items() if r.error}
    assert errors == {
        1: "documents[1]: expected a string document; got int",
        2: "documents[2]: document is empty",
        3: "documents[3]: expected a string document; got NoneType",
        4: "documents[4]: expected a string document; got list",
        5: "documents[5]: document is empty",
        7: "documents[7]: expected a string document; got dict",
    }
    assert all(by_index[i].score is None for i in errors)
    assert {r.index for r in ranked[-len(errors):]} == set(errors)  # failed documents come last
    good = [r for r in ranked if r.error is None]
    assert [r.index for r in good] == [r.index for r in ranked[:3]]  # answered ones first, best first
    for r in good:
        alone = llm.score(QUERY, docs[r.index])
        assert r.document == docs[r.index] and r.score == pytest.approx(alone.score, abs=1e-6)
    assert [r.index for r in llm.rerank(QUERY, docs, top_n=2)] == [r.index for r in ranked[:2]]


def test_a_list_of_ints_or_dicts_is_a_list_of_bad_documents(llm):
    """Not one token-id (or chat) prompt: score() takes text documents, each of them its own item."""
    out = llm.score(QUERY, [101, 102, 103])
    assert [r.error for r in out] == [f"documents[{i}]: expected a string document; got int" for i in range(3)]
    out = llm.score(QUERY, [{"role": "user", "content": "hi"}])
    assert out[0].error == "documents[0]: expected a string document; got dict"
    out = llm.score(QUERY, (GOOD[0], 5))  # a tuple is a list of documents too
    assert out[0].error is None and out[1].error == "documents[1]: expected a string document; got int"


def test_a_single_bad_document_raises(llm):
    _raises("documents", lambda: llm.score(QUERY, ""), "document is empty")
    _raises("documents", lambda: llm.rerank(QUERY, " "), "document is empty")


@pytest.mark.parametrize(
    "call, field, needle",
    [
        (lambda m: m.rerank(5, GOOD), "query", "got int"),
        (lambda m: m.rerank([QUERY], GOOD), "query", "got list"),
        (lambda m: m.rerank("  ", GOOD), "query", "empty"),
        (lambda m: m.score(None, GOOD), "query", "got NoneType"),
        (lambda m: m.rerank(QUERY, 5), "documents", "a string or a list of strings; got int"),
        (lambda m: m.rerank(QUERY, {"text": "x"}), "documents", "got dict"),
        (lambda m: m.score(QUERY, None), "documents", "got NoneType"),
        (lambda m: m.rerank(QUERY, ()), "documents", "empty"),
        (lambda m: m.rerank(QUERY, GOOD, top_n=0), "top_n", "got 0"),
        (lambda m: m.rerank(QUERY, GOOD, top_n=2.0), "top_n", "got 2.0"),
        (lambda m: m.rerank(QUERY, GOOD, truncate=0), "truncate", "got 0"),
        (lambda m: m.score(QUERY, GOOD, truncate="100"), "truncate", "'100'"),
        (lambda m: m.score(QUERY, GOOD, truncation_side="start"), "truncation_side", "'start'"),
        (lambda m: m.rerank(QUERY, GOOD, instruction=["x"]), "instruction", "got list"),
        (lambda m: m.rerank(QUERY, GOOD, images=[None] * 3), "images", "no vision tower"),
    ],
)
def test_score_and_rerank_arguments(llm, call, field, needle):
    _raises(field, lambda: call(llm), needle)


# -- the other methods ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, field, needle",
    [
        (lambda m: m.next_token("hi", top_k=-2), "top_k", "[1, 151669]"),
        (lambda m: m.next_token("hi", top_k=151670), "top_k", "[1, 151669]"),
        (lambda m: m.classify("hi", labels=["a", "b"], truncate=-1), "truncate", "-1"),
        (lambda m: m.classify("hi", labels=["a", "b"], truncation_side=None), "truncation_side", "None"),
        (lambda m: m.classify("hi", labels=("a", "")), "labels[1]", "tokenises to nothing"),
        (lambda m: m.classify("hi", labels=[]), "labels", "empty"),
        (lambda m: m.classify("hi", labels=5), "labels", "got int"),
        (lambda m: m.embed("hi", dimensions=-1), "dimensions", "[1, 32]"),
        (lambda m: m.embed("hi", dimensions=64), "dimensions", "[1, 32]"),
        (lambda m: m.embed("hi", truncate=0), "truncate", "0"),
        (lambda m: m.embed("hi", normalize="no"), "normalize", "'no'"),
        (lambda m: m.embed("hi", normalize=None), "normalize", "None"),
        (lambda m: m.embed("hi", pooling=["mean"]), "pooling", "['mean']"),
        (lambda m: m.embed("hi", prompt_name=["query"]), "prompt_name", "got list"),
        (lambda m: m.embed("hi", images=b"\x89PNG"), "images", "no vision tower"),
        (lambda m: m.next_token([3, -1]), "prompts", "token id -1"),
    ],
)
def test_other_method_arguments(llm, call, field, needle):
    _raises(field, lambda: call(llm), needle)


def test_classifier_head_labels_must_be_its_own(tiny_llm):
    llm = tiny_llm("qwen3_cls3")
    own = llm.classify("some text").probs
    assert len(own) == 3
    for bad in (5, "LABEL_0", ["x", "y", "z"]):
        _raises("labels", lambda: llm.classify("some text", labels=bad), str(list(own)))
    assert llm.classify("some text", labels=list(own)).probs == pytest.approx(own)


def test_chat_the_template_cannot_render_fails_alone(llm):
    """A chat template error (here: tool_calls that are not a list) is the item's typed error."""
    bad = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "tool_calls": 5}]
    good = [{"role": "user", "content": "hello"}]
    out = llm.next_token([good, bad, "plain"])
    assert out[0].error is None and out[2].error is None
    assert out[1].error == "prompts[1]: could not be encoded (TypeError: 'int' object is not iterable)"
    assert out[1].token_id is None
    with pytest.raises(InvalidRequestError) as info:
        llm.classify(bad, labels=["a", "b"])
    assert info.value.field == "prompts"


# -- chat messages: checked before the template, which drops what it does not know --------------

ROLES = "one of 'system', 'user', 'assistant', 'tool'"
USER = {"role": "user", "content": "Is the sky blue?"}


@pytest.mark.parametrize(
    "chat, field, needle",
    [
        ([{"role": "developer", "content": "Be terse."}, USER], "prompts[0].role", f"must be {ROLES}; got 'developer'"),
        ([USER, {"role": "User", "content": "x"}], "prompts[1].role", "got 'User'"),
        ([{"role": None, "content": "x"}], "prompts[0].role", "got None"),
        ([{"role": ["user"], "content": "x"}], "prompts[0].role", "got ['user']"),
        ([{"content": "x"}, USER], "prompts[0].role", f"is missing; give every message a role, {ROLES}"),
        ([USER, {"role": "assistant"}], "prompts[1].content", "is missing; give every message a content, a string"),
        ([{"role": "user", "content": None}], "prompts[0].content", "must be a string; got NoneType"),
        ([{"role": "user", "content": 5}], "prompts[0].content", "must be a string; got int"),
        ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "prompts[0].content",
         "must be a string; got list (content parts need a vision-language model)"),
    ],
)
def test_bad_chat_message_names_its_field(llm, chat, field, needle):
    err = _raises(field, lambda: llm.next_token(chat), needle)
    assert str(err) == f"{field}: {err.reason}"


def test_a_bad_chat_in_a_list_fails_alone(llm):
    good = [[{"role": "system", "content": "You answer yes or no."}, USER], [USER], "The sky is"]
    bad = [USER, {"role": "developer", "content": "Answer no."}]
    items = good + [bad]
    for method, kwargs in ((llm.next_token, {}), (llm.classify, {"labels": ["yes", "no"]}), (llm.embed, {})):
        field = "texts" if method == llm.embed else "prompts"
        out = method(items, **kwargs)
        assert out[3].error == f"{field}[3][1].role: must be {ROLES}; got 'developer'"
        for i, item in enumerate(good):
            alone = method(item, **kwargs)
            assert out[i].error is None and alone.error is None
            if method == llm.next_token:
                assert out[i].token_id == alone.token_id and out[i].logprob == pytest.approx(alone.logprob, abs=1e-5)
            elif method == llm.classify:
                assert out[i].probs == pytest.approx(alone.probs, abs=1e-6)
            else:
                assert out[i].embedding.tolist() == pytest.approx(alone.embedding.tolist(), abs=1e-5)


def test_every_known_role_renders(llm):
    """system, user, assistant and tool each reach the prompt (none is dropped by the template)."""
    chat = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U2"},
            {"role": "assistant", "content": "A3"}, {"role": "tool", "content": "T4"}]
    ids = llm.encoder.encode(chat, "prompts")
    text = llm.tokenizer.decode(ids)
    assert [text.index(m) for m in ("S1", "U2", "A3", "T4")] == sorted(text.index(m) for m in ("S1", "U2", "A3", "T4"))
    assert "<tool_response>\nT4\n</tool_response>" in text
    assert llm.next_token(chat).error is None


# -- the constructor -----------------------------------------------------------------------------


def test_constructor_device_and_dtype(tiny_path):
    path = tiny_path("qwen3_tied")
    _raises("device", lambda: LLM(path, device="gpu"), "'gpu' is not a device")
    _raises("device", lambda: LLM(path, device=3.5), "3.5")
    if not torch.cuda.is_available():
        _raises("device", lambda: LLM(path, device="cuda"), "no CUDA GPU")
    _raises("dtype", lambda: LLM(path, dtype=torch.int8), "torch.int8")
    _raises("dtype", lambda: LLM(path, dtype=["float32"]), "['float32']")
