"""Our preprocessors against transformers' own (PIL backend) on real photos, plus the step prefetcher."""

from __future__ import annotations

import json
import pathlib
import random
import shutil
import threading
import time

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from prefillonly.errors import CheckpointError, ImageError
from prefillonly.vision.llava_next_preprocess import LlavaNextImagePreprocessor, select_best_resolution
from prefillonly.vision.preprocess_pool import default_workers, prefetch
from prefillonly.vision.qwen_preprocess import QwenImagePreprocessor, smart_resize

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "bench" / "configs"  # copies of the released configs
QWEN_MODELS = ["Qwen2.5-VL-3B-Instruct", "Qwen3-VL-2B-Instruct"]

# (height, width): tiny, odd, wide, tall, exact multiples, photo-sized.
SIZES = [(20, 20), (27, 50), (50, 27), (1, 150), (224, 1344), (1344, 224), (333, 517), (448, 448), (512, 512)]
# Huge: 3000x4000 (12M px) still fits Qwen2.5-VL's max_pixels after rounding; 4000x5000 is shrunk by both.
HUGE_SIZES = [(3000, 4000), (4000, 5000)]

LLAVA_NEXT_CONFIG = {  # llava-hf/llava-v1.6-mistral-7b-hf preprocessor_config.json
    "aspect_ratio_setting": "anyres",
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "LlavaNextImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
LLAVA_NEXT_PROCESSOR_CONFIG = {
    "image_token": "<image>",
    "num_additional_image_tokens": 1,
    "patch_size": 14,
    "processor_class": "LlavaNextProcessor",
    "vision_feature_select_strategy": "default",
}


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {
        "astronaut": Image.fromarray(skimage.data.astronaut()),
        "chelsea": Image.fromarray(skimage.data.chelsea()),
        "coffee": Image.fromarray(skimage.data.coffee()),
        "camera": Image.fromarray(skimage.data.camera()).convert("RGB"),
        "rocket": Image.fromarray(skimage.data.rocket()),
    }


def qwen_config(model: str) -> dict:
    return json.loads((CONFIGS / model / "preprocessor_config.json").read_text())


@pytest.fixture(scope="module", params=QWEN_MODELS)
def qwen_pair(request: pytest.FixtureRequest) -> tuple[Qwen2VLImageProcessorPil, QwenImagePreprocessor]:
    cfg = qwen_config(request.param)
    return Qwen2VLImageProcessorPil.from_dict(cfg), QwenImagePreprocessor.from_dict(cfg)


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """Bit-exact equality (fast path first; numpy's detailed diff only on failure)."""
    assert got.dtype == want.dtype == np.float32
    if got.shape != want.shape or not np.array_equal(got, want):
        np.testing.assert_array_equal(got, want)


def on_white(image: Image.Image) -> Image.Image:
    """A transparent image composited onto white: what we do, what transformers' processors do in newer releases
    (5.24 here) and qwen-vl-utils always did. transformers 5.17 (the GPU machine's) drops the alpha band instead,
    so the references get the composited image and the check holds on either version."""
    if image.mode != "RGBA":
        return image
    return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")


def assert_qwen_matches(hf: Qwen2VLImageProcessorPil, ours: QwenImagePreprocessor, image: Image.Image) -> None:
    ref = hf(on_white(image), return_tensors="np")
    got = ours(image)
    assert got.pixel_values.dtype == torch.float32
    assert_same(got.pixel_values.numpy(), ref["pixel_values"])
    assert got.grid_thw == tuple(int(x) for x in ref["image_grid_thw"][0])
    expected_tokens = int(np.prod(ref["image_grid_thw"][0])) // hf.merge_size**2
    assert got.num_tokens == expected_tokens
    w, h = image.size
    assert ours.num_tokens_for_size(h, w) == expected_tokens
    assert hf.get_number_of_image_patches(h, w) == got.pixel_values.shape[0]


# --------------------------------------------------------------------------- Qwen-VL


@pytest.mark.parametrize("photo", ["astronaut", "chelsea", "coffee", "camera", "rocket"])
def test_qwen_matches_transformers(qwen_pair, photos, photo: str) -> None:
    hf, ours = qwen_pair
    assert_qwen_matches(hf, ours, photos[photo])  # native size
    for h, w in SIZES:
        assert_qwen_matches(hf, ours, photos[photo].resize((w, h), Image.Resampling.BILINEAR))


def test_qwen_huge_image_shrunk_like_transformers(qwen_pair, photos) -> None:
    hf, ours = qwen_pair
    h, w = 4000, 5000  # 20M pixels: above max_pixels of both Qwen2.5-VL and Qwen3-VL
    img = photos["rocket"].resize((w, h), Image.Resampling.BILINEAR)
    assert_qwen_matches(hf, ours, img)
    _, gh, gw = ours.grid_thw_for_size(h, w)
    assert gh * gw * ours.patch_size**2 <= ours.max_pixels
    assert gh * ours.patch_size < h and gw * ours.patch_size < w
    # Grids of other huge sizes, without pixels (transformers' own size arithmetic).
    for hh, ww in HUGE_SIZES + [(8000, 6000), (100, 10000), (20000, 20000)]:
        assert ours.grid_thw_for_size(hh, ww)[1:] == tuple(
            s // hf.patch_size
            for s in smart_resize(hh, ww, hf.patch_size * hf.merge_size, hf.size.shortest_edge, hf.size.longest_edge)
        )
        assert ours.num_tokens_for_size(hh, ww) * hf.merge_size**2 == hf.get_number_of_image_patches(hh, ww)


def test_qwen_modes_converted_like_transformers(qwen_pair, photos) -> None:
    hf, ours = qwen_pair
    rgba = photos["chelsea"].convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, rgba.width, dtype=np.uint8), (rgba.height, 1))
    rgba.putalpha(Image.fromarray(alpha))
    for img in (
        rgba,
        photos["astronaut"].convert("L"),
        photos["coffee"].convert("P"),
        photos["rocket"].convert("CMYK"),
    ):
        assert_qwen_matches(hf, ours, img)


def test_qwen_smart_resize_matches_transformers() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = random.Random(0)
    for _ in range(2000):
        h, w = rng.randint(1, 6000), rng.randint(1, 6000)
        if max(h, w) / min(h, w) > 200:
            continue
        for factor, lo, hi in ((28, 3136, 12845056), (32, 65536, 16777216), (28, 3136, 602112)):
            assert smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi)


def test_qwen_extreme_aspect_ratio_rejected_like_transformers(qwen_pair) -> None:
    hf, ours = qwen_pair
    img = Image.new("RGB", (402, 2), (10, 20, 30))  # aspect ratio 201
    with pytest.raises(ValueError, match="aspect ratio"):
        hf(img)
    with pytest.raises(ImageError, match="aspect ratio") as ei:
        ours(img, field="messages[0].content[1]")
    assert ei.value.field == "messages[0].content[1]"
    with pytest.raises(ImageError):
        ours.num_tokens_for_size(2, 402)
    assert_qwen_matches(hf, ours, Image.new("RGB", (400, 2), (10, 20, 30)))  # ratio exactly 200 is fine


def test_qwen_zero_size_and_wrong_type(qwen_pair) -> None:
    _, ours = qwen_pair
    with pytest.raises(ImageError, match="zero size"):
        ours(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="PIL image"):
        ours(np.zeros((28, 28, 3), np.uint8))  # type: ignore[arg-type]


def test_qwen_from_pretrained(tmp_path: pathlib.Path) -> None:
    q25 = QwenImagePreprocessor.from_pretrained(CONFIGS / "Qwen2.5-VL-3B-Instruct")
    assert (q25.patch_size, q25.merge_size, q25.min_pixels, q25.max_pixels) == (14, 2, 3136, 12845056)
    q3 = QwenImagePreprocessor.from_pretrained(CONFIGS / "Qwen3-VL-2B-Instruct")
    assert (q3.patch_size, q3.merge_size, q3.min_pixels, q3.max_pixels) == (16, 2, 65536, 16777216)
    assert q3.factor == 32
    with pytest.raises(CheckpointError):
        QwenImagePreprocessor.from_pretrained(tmp_path)
    # transformers 5 may store the image processor inside processor_config.json.
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": qwen_config(QWEN_MODELS[1])}))
    assert QwenImagePreprocessor.from_pretrained(tmp_path).patch_size == 16


def test_qwen_config_size_resolution() -> None:
    # Top-level min/max_pixels override size (transformers' backward-compatibility rule).
    cfg = {"size": {"shortest_edge": 100, "longest_edge": 200000}, "min_pixels": 4000, "max_pixels": 300000}
    hf, ours = Qwen2VLImageProcessorPil.from_dict(dict(cfg)), QwenImagePreprocessor.from_dict(cfg)
    assert (ours.min_pixels, ours.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge) == (4000, 300000)
    # No size at all: the class defaults of newer transformers (5.24 here; 5.17 had max_pixels 12845056).
    ours = QwenImagePreprocessor.from_dict({})
    assert (ours.min_pixels, ours.max_pixels) == (56 * 56, 28 * 28 * 1280)
    hf = Qwen2VLImageProcessorPil.from_dict({"min_pixels": ours.min_pixels, "max_pixels": ours.max_pixels})
    img = Image.fromarray(skimage.data.coffee())
    assert_qwen_matches(hf, ours, img)
    # jina-reranker-m0 style limits.
    cfg = {"min_pixels": 3136, "max_pixels": 602112}
    assert_qwen_matches(Qwen2VLImageProcessorPil.from_dict(dict(cfg)), QwenImagePreprocessor.from_dict(cfg), img)


def test_qwen_patch_layout() -> None:
    """Row 0 is the top-left patch; the T copies of a still image are identical."""
    ours = QwenImagePreprocessor(min_pixels=56 * 56, max_pixels=56 * 56, do_normalize=False, do_rescale=False)
    arr = np.zeros((56, 56, 3), np.uint8)
    arr[:14, :14] = [1, 2, 3]  # first patch
    arr[:14, 14:28] = [4, 5, 6]  # second patch: same 2x2 merge group, next column
    out = ours(Image.fromarray(arr))
    assert out.grid_thw == (1, 4, 4) and out.num_tokens == 4
    pv = out.pixel_values.view(16, 3, 2, 14, 14)
    assert torch.equal(pv[:, :, 0], pv[:, :, 1])
    assert pv[0, :, 0, 0, 0].tolist() == [1, 2, 3]
    assert pv[1, :, 0, 0, 0].tolist() == [4, 5, 6]


# --------------------------------------------------------------------------- LLaVA-NeXT


class _TokenCounter(LlavaNextProcessor):
    """LlavaNextProcessor's token arithmetic without a tokenizer."""

    def __init__(self, image_processor: LlavaNextImageProcessorPil) -> None:  # noqa: D107
        self.image_processor = image_processor
        self.patch_size = LLAVA_NEXT_PROCESSOR_CONFIG["patch_size"]
        self.num_additional_image_tokens = LLAVA_NEXT_PROCESSOR_CONFIG["num_additional_image_tokens"]
        self.vision_feature_select_strategy = LLAVA_NEXT_PROCESSOR_CONFIG["vision_feature_select_strategy"]

    def count(self, orig_h: int, orig_w: int, h: int, w: int) -> int:
        n = self._get_number_of_features(orig_h, orig_w, h, w)
        return n - 1 if self.vision_feature_select_strategy == "default" else n


def model_feature_count(
    image_size: tuple[int, int], pinpoints: list[list[int]], tile: int = 336, patch: int = 14
) -> int:
    """Image features LlavaNextModel.pack_image_features produces (base + unpadded grid + newlines)."""
    side = tile // patch
    rows, cols = get_anyres_image_grid_shape(list(image_size), pinpoints, tile)
    grid = unpad_image(torch.zeros(1, rows * side, cols * side), list(image_size))
    return side * side + grid.shape[1] * (grid.shape[2] + 1)


@pytest.fixture(scope="module")
def llava_pair() -> tuple[LlavaNextImageProcessorPil, LlavaNextImagePreprocessor]:
    return (
        LlavaNextImageProcessorPil.from_dict(dict(LLAVA_NEXT_CONFIG)),
        LlavaNextImagePreprocessor.from_dict(LLAVA_NEXT_CONFIG, LLAVA_NEXT_PROCESSOR_CONFIG),
    )


def assert_llava_matches(hf: LlavaNextImageProcessorPil, ours: LlavaNextImagePreprocessor, image: Image.Image) -> None:
    ref = hf(on_white(image), return_tensors="np")
    got = ours(image)
    assert_same(got.pixel_values.numpy(), ref["pixel_values"][0])
    assert got.image_size == tuple(int(x) for x in ref["image_sizes"][0])
    th, tw = got.pixel_values.shape[-2:]
    h, w = got.image_size
    expected = _TokenCounter(hf).count(h, w, th, tw)
    assert got.num_tokens == expected
    assert ours.num_tokens_for_size(h, w) == expected
    assert ours.num_patches_for_size(h, w) == got.pixel_values.shape[0]


@pytest.mark.parametrize("photo", ["astronaut", "chelsea", "coffee", "camera", "rocket"])
def test_llava_next_matches_transformers(llava_pair, photos, photo: str) -> None:
    hf, ours = llava_pair
    assert_llava_matches(hf, ours, photos[photo])
    for h, w in [*SIZES, (672, 672), (1000, 300), (300, 1000)]:
        assert_llava_matches(hf, ours, photos[photo].resize((w, h), Image.Resampling.BILINEAR))


def test_llava_next_huge_and_modes(llava_pair, photos) -> None:
    hf, ours = llava_pair
    assert_llava_matches(hf, ours, photos["astronaut"].resize((4000, 3000), Image.Resampling.BILINEAR))
    rgba = photos["coffee"].convert("RGBA")
    rgba.putalpha(100)
    assert_llava_matches(hf, ours, rgba)
    assert_llava_matches(hf, ours, photos["camera"].convert("L"))


def test_llava_next_token_count_matches_model() -> None:
    """The prompt's <image> count equals the features the model will scatter into it."""
    ours = LlavaNextImagePreprocessor.from_dict(LLAVA_NEXT_CONFIG, LLAVA_NEXT_PROCESSOR_CONFIG)
    pinpoints = LLAVA_NEXT_CONFIG["image_grid_pinpoints"]
    rng = random.Random(0)
    sizes = [(20, 20), (27, 50), (1, 500), (224, 1344), (336, 336), (3000, 4000)]
    sizes += [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(300)]
    for h, w in sizes:
        assert ours.num_tokens_for_size(h, w) == model_feature_count((h, w), pinpoints), (h, w)


def test_llava_next_class_defaults_match(photos) -> None:
    """transformers' class defaults (224 tiles) with our defaults."""
    hf = LlavaNextImageProcessorPil()
    ours = LlavaNextImagePreprocessor()
    assert ours.output_size == (224, 224)
    for h, w in [(300, 451), (50, 27), (1344, 224)]:
        ref = hf(photos["chelsea"].resize((w, h)), return_tensors="np")
        got = ours(photos["chelsea"].resize((w, h)))
        np.testing.assert_array_equal(got.pixel_values.numpy(), ref["pixel_values"][0])


def test_llava_next_select_best_resolution() -> None:
    from transformers.image_processing_utils import select_best_resolution as hf_select

    pinpoints = LLAVA_NEXT_CONFIG["image_grid_pinpoints"]
    rng = random.Random(1)
    for _ in range(1000):
        size = (rng.randint(1, 5000), rng.randint(1, 5000))
        assert select_best_resolution(size, pinpoints) == hf_select(size, pinpoints)


def test_llava_next_from_pretrained_and_errors(tmp_path: pathlib.Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(LLAVA_NEXT_CONFIG))
    (tmp_path / "processor_config.json").write_text(json.dumps(LLAVA_NEXT_PROCESSOR_CONFIG))
    ours = LlavaNextImagePreprocessor.from_pretrained(tmp_path)
    assert ours.output_size == (336, 336)
    assert ours.num_tokens_for_size(336, 336) == 1176
    with pytest.raises(ImageError, match="zero size"):
        ours(Image.new("RGB", (0, 3)))
    with pytest.raises(ImageError, match="PIL image"):
        ours(b"png bytes")  # type: ignore[arg-type]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError):
        LlavaNextImagePreprocessor.from_pretrained(empty)
    shutil.rmtree(empty)


# --------------------------------------------------------------------------- pixel dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qwen_half_pixels_are_the_float32_pixels_converted(photos, dtype) -> None:
    """The tower converts pixels to its dtype first: asking for that dtype must change no bit."""
    pre = QwenImagePreprocessor.from_dict(qwen_config("Qwen3-VL-2B-Instruct"))
    for img in (photos["chelsea"], photos["chelsea"].resize((333, 517))):
        ref = pre(img)
        got = pre(img, dtype=dtype)
        assert got.pixel_values.dtype == dtype and got.grid_thw == ref.grid_thw
        assert torch.equal(got.pixel_values, ref.pixel_values.to(dtype))


def test_qwen_pixels_in_pinned_memory(photos, monkeypatch) -> None:
    """pin_memory=True allocates the output page-locked (on a machine without CUDA, the request is checked
    at the allocator, which cannot pin there) and writes the same pixels."""
    pre = QwenImagePreprocessor.from_dict(qwen_config("Qwen3-VL-2B-Instruct"))
    asked = []
    if not torch.cuda.is_available():
        real_empty = torch.empty

        def empty(*shape, pin_memory=False, **kw):
            asked.append(pin_memory)
            return real_empty(*shape, **kw)

        monkeypatch.setattr(torch, "empty", empty)
    got = pre(photos["chelsea"], dtype=torch.bfloat16, pin_memory=True)
    assert got.pixel_values.is_pinned() if torch.cuda.is_available() else asked == [True]
    assert torch.equal(got.pixel_values, pre(photos["chelsea"]).pixel_values.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen_pixels_patchified_in_torch_equal_the_cpu_path(photos, dtype) -> None:
    """patchify=False hands over the resized uint8 pixels (for a GPU to patchify); patchifying them with
    torch ops gives the CPU path's patches bit for bit, for Qwen3-VL's and Qwen2-VL's patch sizes."""
    for name in ("Qwen3-VL-2B-Instruct", "Qwen2.5-VL-3B-Instruct"):
        pre = QwenImagePreprocessor.from_dict(qwen_config(name))
        for img in (photos["chelsea"], photos["astronaut"].resize((333, 517)), photos["coffee"].resize((20, 9))):
            ref = pre(img, dtype=dtype)
            raw = pre(img, dtype=dtype, patchify=False)
            assert raw.pixels.dtype == torch.uint8 and raw.pixels.shape[:2] == tuple(
                g * pre.patch_size for g in ref.grid_thw[1:])
            got = raw.patchify()
            assert got.grid_thw == ref.grid_thw and got.num_tokens == ref.num_tokens
            assert got.pixel_values.dtype == dtype and torch.equal(got.pixel_values, ref.pixel_values)


# --------------------------------------------------------------------------- prefetch


def test_prefetch_keeps_step_order_dedups_and_isolates_failures() -> None:
    def work(x: int) -> int:
        time.sleep(random.random() * 0.003)
        if x % 7 == 3:
            raise ValueError(f"bad item {x}")
        return x * x

    steps = [list(range(i, i + 5)) for i in range(0, 50, 5)]
    steps[3] = steps[3] + steps[1][:2]  # items seen in an earlier step are not processed again
    out = list(prefetch(work, steps, ahead=2))
    assert [[x for x, _ in done] for done in out] == [list(range(i, i + 5)) for i in range(0, 50, 5)]
    for done in out:
        for x, r in done:
            if x % 7 == 3:
                assert isinstance(r, ValueError) and str(r) == f"bad item {x}"
            else:
                assert r == x * x


def test_prefetch_window_is_bounded() -> None:
    """While step k is consumed, nothing beyond step k + ahead has been started."""
    started: list[int] = []
    lock = threading.Lock()

    def work(x: int) -> int:
        with lock:
            started.append(x)
        return x

    steps = [[10 * k + j for j in range(3)] for k in range(12)]
    for ahead in (0, 2):
        started.clear()
        for k, done in enumerate(prefetch(work, steps, ahead=ahead)):
            assert [x for x, _ in done] == steps[k]
            time.sleep(0.005)  # give the workers every chance to run ahead
            with lock:
                assert max(started) // 10 <= k + ahead
        assert sorted(started) == [x for step in steps for x in step]


def test_prefetch_skips_unwanted_and_cancels_on_close() -> None:
    started = []

    def slow(x: int) -> int:
        started.append(x)
        time.sleep(0.05)
        return x

    steps = [[k] for k in range(100)]
    out = list(prefetch(slow, steps[:6], ahead=1, wanted=lambda x: x % 2 == 0))
    assert out == [[(0, 0)], [], [(2, 2)], [], [(4, 4)], []]
    started.clear()
    it = prefetch(slow, steps, ahead=3)
    assert next(it) == [(0, 0)]
    it.close()  # leaving early cancels the steps queued but not started
    time.sleep(0.2)
    assert len(started) <= 4
    with pytest.raises(ValueError, match="ahead"):
        next(prefetch(slow, steps, ahead=-1))
    assert 1 <= default_workers() <= 16


def test_prefetch_with_real_images(photos) -> None:
    """The intended use: preprocess many images, one of them broken, in threads."""
    pre = QwenImagePreprocessor.from_dict(qwen_config("Qwen2.5-VL-3B-Instruct"))
    good = photos["chelsea"]
    steps = [[good, "not an image"], [good.resize((100, 60))]]
    out = [r for done in prefetch(pre, steps, ahead=1) for _, r in done]
    assert torch.equal(out[0].pixel_values, pre(good).pixel_values)
    assert isinstance(out[1], ImageError)
    assert out[2].num_tokens == pre.num_tokens_for_size(60, 100)
