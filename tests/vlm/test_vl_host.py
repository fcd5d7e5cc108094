"""Host-side work of image requests: preprocessing ahead of the steps in a bounded window, per-request
failure there, compact encoder-cache entries, and chats rendered once per distinct text."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import TEST_DEVICE

from prefillonly import LLM
from prefillonly.errors import ImageError
from prefillonly.models.vision import EncoderCache
from prefillonly.models.vision.vlm import PREFETCH_STEPS
from prefillonly.vision.qwen_preprocess import QwenImagePreprocessor

from .vlm_helpers import rand_image

LABELS = ["yes", "no"]


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("qwen3_vl"), dtype="float32", device=TEST_DEVICE, use_tqdm=False)


def _ask(image, text="Is it red?"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def _watch_preprocessing(monkeypatch, log: list, fail_size: tuple[int, int] | None = None) -> None:
    """Log (``"pre"``, image size) for every preprocessed image; raise for images of ``fail_size``."""
    real = QwenImagePreprocessor.__call__
    lock = threading.Lock()

    def call(self, image, **kw):
        with lock:
            log.append(("pre", image.size))
        if image.size == fail_size:
            raise ImageError(kw.get("field", "image"), "simulated preprocessing failure")
        return real(self, image, **kw)

    monkeypatch.setattr(QwenImagePreprocessor, "__call__", call)


def test_prefetch_window_is_never_exceeded(llm, monkeypatch):
    """With one request per step, no image more than PREFETCH_STEPS steps beyond the next one is touched."""
    images = [rand_image(64 + 32 * i, 64, 40 + i) for i in range(9)]  # distinct sizes: one image per step
    log: list = []
    _watch_preprocessing(monkeypatch, log)
    observer = lambda step: log.append(("step", [r.item.image.size for s in step.seqs for r in s.extras["images"]]))
    llm.runner.observers.append(observer)
    budget = llm.runner.max_num_batched_tokens
    llm.runner.max_num_batched_tokens = 1
    llm.model.encoder_cache.clear()
    try:
        results = llm.classify([_ask(img) for img in images], labels=LABELS)
    finally:
        llm.runner.observers.remove(observer)
        llm.runner.max_num_batched_tokens = budget
    assert all(r.error is None for r in results)
    steps = [sizes for kind, sizes in log if kind == "step"]
    assert len(steps) == len(images) and all(len(s) == 1 for s in steps)
    step_of = {sizes[0]: k for k, sizes in enumerate(steps)}
    assert sorted(size for kind, size in log if kind == "pre") == sorted(step_of)  # each image preprocessed once
    # Once step k is launched the runner asks for step k + 1, which starts step k + 1 + PREFETCH_STEPS.
    running = -1
    for kind, what in log:
        if kind == "step":
            running += 1
        else:
            assert step_of[what] <= running + 1 + PREFETCH_STEPS


def test_a_failed_preprocessing_fails_only_its_request(llm, monkeypatch):
    images = [rand_image(96, 64, 51), rand_image(80, 80, 52), rand_image(64, 128, 53)]
    alone = [llm.classify(_ask(img), labels=LABELS) for img in (images[0], images[2])]
    log: list = []
    _watch_preprocessing(monkeypatch, log, fail_size=images[1].size)
    for budget in (16384, 1):  # all in one step, and one request per step
        llm.runner.max_num_batched_tokens = budget
        llm.model.encoder_cache.clear()
        try:
            out = llm.classify([_ask(img) for img in images], labels=LABELS)
        finally:
            llm.runner.max_num_batched_tokens = 16384
        assert out[1].error is not None and "simulated preprocessing failure" in out[1].error
        assert "messages[1]" in out[1].error or "prompts[1]" in out[1].error
        for got, ref in zip((out[0], out[2]), alone):
            assert got.error is None and abs(got.probs["yes"] - ref.probs["yes"]) < 1e-6
    with pytest.raises(ImageError):
        llm.model.encoder_cache.clear()
        llm.classify(_ask(images[1]), labels=LABELS)


def test_cache_entries_hold_their_own_storage():
    """A view into a whole tower call's output is stored as a compact copy: the bytes charged are the bytes held."""
    out = torch.arange(40, dtype=torch.float32).view(10, 4)
    deep = torch.ones(10, 4)
    mains, deeps = out.split([3, 7]), deep.split([3, 7])
    cache = EncoderCache(max_bytes=1000)
    kept = cache.put("a", (mains[0], (deeps[0],)))
    assert torch.equal(kept[0], mains[0]) and torch.equal(kept[1][0], deeps[0])
    for t in (kept[0], *kept[1]):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert cache.bytes == 2 * 3 * 4 * 4 and cache.get("a") is kept
    own = torch.zeros(2, 4)
    assert cache.put("b", (own, ()))[0] is own  # already compact: not copied
    big = torch.zeros(100, 4)
    assert cache.put("big", (big, ()))[0] is big and "big" not in cache  # over budget: used, not stored


def test_identical_chats_are_rendered_once(llm, monkeypatch):
    """Chats that differ only in their images are rendered and tokenised once per call, with the same ids."""
    images = [rand_image(96, 64, 61), rand_image(64, 96, 62), rand_image(96, 64, 63)]
    prompts = [_ask(images[0]), _ask(images[1]), _ask(images[2], "Is it blue?"), _ask(images[0])]
    prompts.append([{"role": "user", "content": [{"type": "image", "image": images[1]},
                                                 {"type": "text", "text": "Is it red?"}], "meta": object()}])
    expected = []
    for prompt in prompts:  # one call per prompt: nothing to share
        llm.mm.reset()
        llm.mm.begin(None)
        expected.append(llm.mm.encode(prompt, "p"))
    llm.mm.reset()
    calls = []
    real = type(llm.tokenizer).apply_chat_template
    monkeypatch.setattr(type(llm.tokenizer), "apply_chat_template",
                        lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    got = []
    for prompt in prompts:
        llm.mm.begin(None)
        got.append(llm.mm.encode(prompt, "p"))
    llm.mm.reset()
    assert got == expected
    assert len(calls) == 3  # "Is it red?", "Is it blue?", and the chat with a value that cannot be compared
    assert got[0] == got[3]
    got[0].append(-1)
    assert got[3] == expected[3]  # each sequence owns its ids


def test_a_long_image_call_starts_before_every_request_is_rendered(llm, monkeypatch):
    """Image requests are rendered in windows too: the first step (the runner's small one) runs after a
    few requests are rendered, later windows are rendered while steps run, each result is what it is alone,
    and a bad image in a later window fails alone."""
    images = [rand_image(48 + 16 * (i % 4), 64 + 8 * (i % 3), 70 + i) for i in range(24)]
    chats = [_ask(img, f"Is it red? ({i})") for i, img in enumerate(images)]
    chats[17] = _ask(b"these bytes are not an image")
    sizes: list[int] = []
    llm.runner.observers.append(lambda step: sizes.append(len(step.input_ids)))
    try:
        llm.classify(chats[0], labels=LABELS)
    finally:
        llm.runner.observers.clear()
    rendered: list[str] = []
    encode = llm.mm.encode
    monkeypatch.setattr(llm.mm, "encode", lambda p, f, *a, **kw: (rendered.append(f), encode(p, f, *a, **kw))[1])
    at_step: list[int] = []
    llm.runner.observers.append(lambda step: at_step.append(len(rendered)))
    budget = llm.runner.max_num_batched_tokens
    llm.runner.max_num_batched_tokens = 8 * sizes[0]  # about eight requests a step, one in the first
    llm.model.encoder_cache.clear()
    try:
        together = llm.classify(chats, labels=LABELS)
    finally:
        llm.runner.observers.clear()
        llm.runner.max_num_batched_tokens = budget
    assert at_step[0] <= 3 < len(chats) == len(rendered)
    assert len(set(at_step)) >= 3  # rendering went on between steps
    assert together[17].error is not None and "[17]" in together[17].error
    monkeypatch.undo()
    for i, r in enumerate(together):
        if i != 17:
            alone = llm.classify(chats[i], labels=LABELS)
            assert r.error is None and abs(r.probs["yes"] - alone.probs["yes"]) < 1e-5, (i, r, alone)


def test_pixels_patchified_on_the_device_give_the_same_answers(llm, monkeypatch):
    """For a GPU the workers hand over resized uint8 pixels and the device patchifies them: forced here on
    the CPU, the answers are the CPU path's (float32: identical), and every image went that way."""
    from prefillonly.models.vision import vlm

    chats = [_ask(rand_image(40 + 24 * i, 90 - 16 * i, 300 + i)) for i in range(4)]
    chats.append(_ask(rand_image(8, 12, 310)))  # smaller than a patch: resized up
    llm.model.encoder_cache.clear()
    want = llm.classify(chats, labels=LABELS)
    arrived: list[str] = []
    real_arrive = vlm._arrive

    def arrive(x, device):
        arrived.append(type(x).__name__)
        return real_arrive(x, device)

    options = llm.model.pixel_options()
    monkeypatch.setattr(vlm, "_arrive", arrive)
    monkeypatch.setattr(type(llm.model), "pixel_options", lambda self: {**options, "patchify": False})
    llm.model.encoder_cache.clear()
    got = llm.classify(chats, labels=LABELS)
    assert arrived == ["QwenPixels"] * len(chats)
    for g, w in zip(got, want):
        assert g.error is None and g.probs == w.probs, (g, w)
