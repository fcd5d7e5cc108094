"""Per-request failure for unusable images, the encoder cache, and prompt/placeholder handling."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
import torch
from PIL import Image
from tiny_models import TEST_DEVICE

from prefillonly import LLM
from prefillonly.errors import ImageError, InvalidRequestError
from prefillonly.models.vision import EncoderCache

from .vlm_helpers import png_bytes, rand_image

GOOD = [rand_image(80, 60, 21), rand_image(60, 120, 22)]


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("qwen2_5_vl"), dtype="float32", device=TEST_DEVICE, use_tqdm=False)


def _zero_width_png() -> bytes:
    ihdr = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buf, format="PNG")  # 100 Mpx, a few KB on disk
    return buf.getvalue()


def _ask(image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_images_fail_alone(llm, tmp_path):
    good_png = png_bytes(GOOD[0])
    bad = {
        "truncated": good_png[: len(good_png) // 2],
        "not an image": b"this is plain text, not a picture" * 10,
        "zero size": _zero_width_png(),
        "bomb": _bomb_png(),
        "unreachable url": "http://127.0.0.1:9/nothing.png",
        "missing file": str(tmp_path / "nope.png"),
        "empty bytes": b"",
    }
    prompts = [_ask(GOOD[0])] + [_ask(b) for b in bad.values()] + [_ask("data:image/png;base64," + base64.b64encode(png_bytes(GOOD[1])).decode())]
    results = llm.classify(prompts, labels=["yes", "no"])
    assert results[0].error is None and results[-1].error is None
    for name, r in zip(bad, results[1:-1]):
        assert r.error is not None, name
        assert r.probs == {}
    alone = llm.classify(_ask(GOOD[0]), labels=["yes", "no"])
    assert abs(alone.probs["yes"] - results[0].probs["yes"]) < 1e-6
    with pytest.raises(ImageError):
        llm.classify(_ask(bad["truncated"]), labels=["yes", "no"])
    # images= with a plain prompt fails per item too
    out = llm.next_token(["Describe:", "Describe:"], images=[b"junk", GOOD[1]])
    assert out[0].error is not None and out[1].error is None


def test_encoder_runs_once_per_image(checkpoint):
    llm = LLM(checkpoint("qwen3_vl"), dtype="float32", device=TEST_DEVICE, use_tqdm=False)
    stats = llm.model.encoder_stats
    img = GOOD[1]
    questions = ["Is it red?", "Is it round?", "Is it big?"]
    first = llm.classify([_ask_text(img, q) for q in questions], labels=["yes", "no"])
    assert stats.images_encoded == 1 and stats.calls == 1
    # the same pixels, loaded from PNG bytes, in a later call: a cache hit, no encoder call
    again = llm.classify([_ask_text(png_bytes(img), q) for q in questions], labels=["yes", "no"])
    assert stats.images_encoded == 1 and stats.calls == 1 and stats.hits >= 1
    for a, b in zip(first, again):
        assert abs(a.probs["yes"] - b.probs["yes"]) < 1e-6
    # one request per step (small token budget): still one encode, across steps, thanks to the cache
    llm.runner.max_num_batched_tokens = 1
    llm.classify([_ask_text(GOOD[0], q) for q in questions], labels=["yes", "no"])
    assert stats.images_encoded == 2


def _ask_text(image, text):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def test_cache_bound_evicts_least_recent(checkpoint):
    llm = LLM(checkpoint("qwen2_vl"), dtype="float32", device=TEST_DEVICE, use_tqdm=False, encoder_cache_bytes=0)
    stats = llm.model.encoder_stats
    llm.runner.max_num_batched_tokens = 1  # one request per step
    llm.classify([_ask(GOOD[0]), _ask(GOOD[0])], labels=["yes", "no"])
    assert stats.images_encoded == 2  # no cache: encoded in each step
    cache = EncoderCache(max_bytes=100)
    f = (torch.zeros(5, dtype=torch.float32), ())  # 20 bytes each
    for k in "abcde":
        cache.put(k, f)
    assert len(cache) == 5 and cache.bytes == 100
    cache.get("a")  # a is now the most recent
    cache.put("f", f)
    assert "b" not in cache and "a" in cache and cache.bytes == 100
    cache.put("huge", (torch.zeros(100), ()))
    assert "huge" not in cache


def test_plain_prompt_markers_and_errors(llm):
    mm = llm.mm
    llm.mm.reset()
    # markers in the text are filled in order; without markers they are put first
    mm.begin([GOOD[0], GOOD[1]])
    ids = mm.encode("A <|vision_start|><|image_pad|><|vision_end|> then <|vision_start|><|image_pad|><|vision_end|>", "p")
    n0, n1 = (mm._recorded[0].num_tokens, mm._recorded[1].num_tokens)
    pad = llm.model.info.image_token_id
    assert ids.count(pad) == n0 + n1
    grid = mm._recorded[0].grid
    assert n0 == grid[0] * grid[1] * grid[2] // 4
    mm.begin([GOOD[0]])
    ids2 = mm.encode("Describe", "p")
    assert ids2[0] == llm.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    mm.begin([GOOD[0]])
    with pytest.raises(InvalidRequestError):
        mm.encode("<|image_pad|> and <|image_pad|>", "p")  # two markers, one image
    mm.reset()
    # errors a caller can act on
    with pytest.raises(InvalidRequestError):
        llm.next_token(["a", "b"], images=[GOOD[0]])  # not one entry per prompt
    with pytest.raises(InvalidRequestError):
        llm.next_token([1, 2, 151655, 3])  # a placeholder token without its image
    with pytest.raises(InvalidRequestError):
        llm.classify(_ask(GOOD[1]), labels=["yes", "no"], truncate=5)  # truncation cuts the image
    res = llm.next_token([[{"role": "user", "content": "text only"}], "plain text"])
    assert all(r.error is None for r in res)
    # one file object shared by several requests of a call is read once
    shared = io.BytesIO(png_bytes(GOOD[0]))
    res = llm.next_token(["first:", "second:"], images=[shared, shared])
    assert all(r.error is None for r in res) and res[0].token_id == res[1].token_id


def test_bad_chat_messages_named_like_the_text_path(llm):
    """A VLM chat goes through the same message check: a role the template would drop fails its item alone."""
    system = {"role": "developer", "content": [{"type": "text", "text": "Answer yes or no."}]}
    out = llm.classify([_ask(GOOD[0]), [system] + _ask(GOOD[0])], labels=["yes", "no"])
    assert out[1].error == "prompts[1][0].role: must be one of 'system', 'user', 'assistant', 'tool'; got 'developer'"
    alone = llm.classify(_ask(GOOD[0]), labels=["yes", "no"])
    assert out[0].error is None and out[0].probs == pytest.approx(alone.probs, abs=1e-6)
    with pytest.raises(InvalidRequestError) as info:
        llm.classify([{"role": "user", "content": None}], labels=["yes", "no"])
    assert info.value.field == "prompts[0].content"
    assert info.value.reason == "must be a string or a list of content parts; got NoneType"
