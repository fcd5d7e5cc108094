"""Our Qwen2-VL / Qwen2.5-VL / Qwen3-VL path against transformers' forward, float32 on CPU.

Every batch mixes images of different sizes and aspect ratios, several images
in one prompt, and text-only requests; each request's reference runs alone
through transformers (input ids built the way its processor builds them).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import TEST_DEVICE

from prefillonly import LLM

from .vlm_helpers import MARKER, hf_inputs, hf_model, hf_render, rand_image

ARCHES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
IMGS = [rand_image(90, 50, 1), rand_image(40, 130, 2), rand_image(300, 260, 3), rand_image(64, 64, 4)]


@pytest.fixture(scope="module", params=ARCHES)
def pair(request, checkpoint):
    path = checkpoint(request.param)
    llm = LLM(path, dtype="float32", device=TEST_DEVICE, use_tqdm=False)
    return request.param, path, llm, hf_model(path)


def _chats():
    return [
        [{"role": "user", "content": [{"type": "image", "image": IMGS[0]}, {"type": "text", "text": "What is this?"}]}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [
                {"type": "text", "text": "Compare"}, {"type": "image", "image": IMGS[1]},
                {"type": "text", "text": " and "}, {"type": "image_url", "image_url": {"url": IMGS[2]}},
                {"type": "text", "text": ". Which is brighter?"},
            ]},
        ],
        [{"role": "user", "content": "Just text here, no image."}],
    ]


def _images_of(messages):
    out = []
    for m in messages:
        if isinstance(m["content"], list):
            for p in m["content"]:
                if p.get("type") == "image":
                    out.append(p["image"])
                elif p.get("type") == "image_url":
                    out.append(p["image_url"]["url"])
    return out


def _hf_last(hf, path, tok, text, images):
    inp = hf_inputs(path, tok, text, images)
    with torch.no_grad():
        out = hf(**inp, output_hidden_states=True)
    return out.logits[0, -1].double(), out.hidden_states[-1][0, -1].double(), inp["input_ids"][0].tolist()


def _references(pair, prompts):
    _arch, path, llm, hf = pair
    tok = llm.tokenizer
    refs = []
    for p in prompts:
        if isinstance(p, tuple):  # (plain text with markers, images)
            text, images = p
        else:
            text, images = hf_render(tok, p), _images_of(p)
        refs.append(_hf_last(hf, path, tok, text, images))
    return refs


def test_token_ids_match_the_processor(pair):
    _arch, _path, llm, _hf = pair
    chats = _chats()
    refs = _references(pair, chats)
    for chat, (_, _, ref_ids) in zip(chats, refs):
        assert llm.mm.encode_chat(chat, "p") == ref_ids
        llm.mm.reset()


def test_next_token_matches_transformers(pair):
    _arch, _path, llm, _hf = pair
    prompts = _chats() + ["Describe the picture:"]
    plain_images = [None, None, None, [IMGS[3]]]
    results = llm.next_token(prompts, top_k=5, images=plain_images)
    refs = _references(pair, _chats() + [(MARKER + "Describe the picture:", [IMGS[3]])])
    for r, (logits, _, _) in zip(results, refs):
        assert r.error is None, r.error
        ref = torch.log_softmax(logits, -1)
        assert r.token_id == int(ref.argmax())
        for t in r.top_logprobs:
            assert abs(t.logprob - float(ref[t.token_id])) < 1e-4
            assert abs(torch.tensor(t.logprob).exp() - ref[t.token_id].exp()) <= 1e-4


def test_classify_matches_transformers(pair):
    _arch, _path, llm, _hf = pair
    labels = ["yes", "no", "maybe"]
    results = llm.classify(_chats(), labels=labels)
    refs = _references(pair, _chats())
    ids = [llm.tokenizer.encode(x, add_special_tokens=False)[0] for x in labels]
    for r, (logits, _, _) in zip(results, refs):
        assert r.error is None, r.error
        ref = torch.softmax(logits[ids], -1)
        for j, label in enumerate(labels):
            assert abs(r.probs[label] - float(ref[j])) <= 1e-4


def test_images_change_the_answer_and_mrope_matters(pair):
    """Sanity: the references are sensitive to images and to M-RoPE, so the parity above means something."""
    _arch, _path, llm, _hf = pair
    chat = _chats()[1]
    base = llm.next_token(chat, top_k=3)
    other = llm.next_token([{**m, "content": [p if p.get("type") != "image" else {"type": "image", "image": IMGS[3]}
                                             for p in m["content"]]} if isinstance(m["content"], list) else m
                            for m in chat], top_k=3)
    assert abs(base.logprob - other.logprob) > 1e-4 or base.token_id != other.token_id
    llm.mm.info.mrope = False  # plain 1-D positions for image tokens: a different model
    try:
        flat = llm.next_token(chat, top_k=3)
    finally:
        llm.mm.info.mrope = True
    assert abs(base.logprob - flat.logprob) > 1e-5 or base.token_id != flat.token_id


def test_embed_matches_transformers(pair):
    """Qwen3-VL-Embedding semantics: instruction as system turn, images then text, last token, normalised."""
    _arch, _path, llm, _hf = pair
    items = ["a photo of a cat", IMGS[0], {"text": "two pictures", "images": [IMGS[1], IMGS[3]]}]
    results = llm.embed(items)
    sys_turn = {"role": "system", "content": [{"type": "text", "text": "Represent the user's input."}]}
    chats = [
        [sys_turn, {"role": "user", "content": [{"type": "text", "text": "a photo of a cat"}]}],
        [sys_turn, {"role": "user", "content": [{"type": "image", "image": IMGS[0]}]}],
        [sys_turn, {"role": "user", "content": [{"type": "image", "image": IMGS[1]}, {"type": "image", "image": IMGS[3]},
                                                {"type": "text", "text": "two pictures"}]}],
    ]
    refs = _references(pair, chats)
    for r, (_, hidden, _) in zip(results, refs):
        assert r.error is None, r.error
        ref = torch.nn.functional.normalize(hidden, dim=-1)
        ours = torch.as_tensor(r.embedding, dtype=torch.float64)
        assert abs(float(ours.norm()) - 1.0) < 1e-5
        assert float(ours @ ref) >= 0.99999


def test_score_matches_qwen3_vl_reranker(pair):
    _arch, _path, llm, _hf = pair
    tok = llm.tokenizer
    yes, no = tok.encode("yes", add_special_tokens=False)[0], tok.encode("no", add_special_tokens=False)[0]
    query = "a bright picture"
    docs = [IMGS[2], "a text-only document", {"text": "caption", "image": IMGS[0]}]
    scores = llm.score(query, docs)
    image_query = llm.score({"image": IMGS[1]}, ["does this match?"])
    instr = "Given a search query, retrieve relevant candidates that answer the query."
    system = {"role": "system", "content": [{"type": "text", "text": 'Judge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be "yes" or "no".'}]}

    def user(q_parts, d_parts):
        return {"role": "user", "content": [{"type": "text", "text": f"<Instruct>: {instr}"}, {"type": "text", "text": "<Query>:"},
                                            *q_parts, {"type": "text", "text": "\n<Document>:"}, *d_parts]}

    q = [{"type": "text", "text": query}]
    chats = [
        [system, user(q, [{"type": "image", "image": IMGS[2]}])],
        [system, user(q, [{"type": "text", "text": "a text-only document"}])],
        [system, user(q, [{"type": "image", "image": IMGS[0]}, {"type": "text", "text": "caption"}])],
        [system, user([{"type": "image", "image": IMGS[1]}], [{"type": "text", "text": "does this match?"}])],
    ]
    refs = _references(pair, chats)
    for s, (logits, _, _) in zip([*scores, *image_query], refs):
        assert s.error is None, s.error
        ref = torch.sigmoid(logits[yes] - logits[no])
        assert abs(s.score - float(ref)) <= 1e-4
    ranked = llm.rerank(query, docs)
    assert [r.index for r in ranked] == sorted(range(3), key=lambda i: -scores[i].score)
    assert ranked[[r.index for r in ranked].index(1)].document == "a text-only document"
