"""LLaVA-NeXT (CLIP tower, anyres tiles, image_newline, Llama LM) against transformers, float32 on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import TEST_DEVICE, qwen_tokenizer_dir

from prefillonly import LLM

from .vlm_helpers import rand_image

PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56]]
IMGS = [rand_image(100, 40, 31), rand_image(30, 90, 32), rand_image(70, 70, 33)]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    import transformers as tf

    path = tmp_path_factory.mktemp("llava") / "llava_next"
    path.mkdir()
    tok = tf.AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    image_id = tok.convert_tokens_to_ids("<image>")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = tf.LlavaNextConfig(
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
        image_token_index=image_id,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
    )
    model = tf.LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                p.normal_(0.0, 0.5)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    pre = {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}, "image_grid_pinpoints": PINPOINTS,
           "do_center_crop": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "LlavaNextImageProcessor"}
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    (path / "processor_config.json").write_text(json.dumps(
        {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}))
    return path, model, tok, pre


def test_llava_next_matches_transformers(llava):
    from transformers import LlavaNextImageProcessorPil

    path, hf, tok, pre = llava
    llm = LLM(path, dtype="float32", device=TEST_DEVICE, use_tqdm=False)
    prompts = ["Describe <image> briefly.", "Compare <image> with <image>.", "No image here."]
    images = [[IMGS[0]], [IMGS[1], IMGS[2]], None]
    results = llm.next_token(prompts, top_k=4, images=images)
    probs = llm.classify(prompts, labels=["yes", "no"], images=images)
    proc = LlavaNextImageProcessorPil(**{k: v for k, v in pre.items() if k != "image_processor_type"})
    yes, no = (tok.encode(x, add_special_tokens=False)[0] for x in ("yes", "no"))
    for prompt, imgs, r, c in zip(prompts, images, results, probs):
        assert r.error is None and c.error is None, (r.error, c.error)
        text = prompt
        kwargs = {}
        if imgs:
            out = proc(images=imgs, return_tensors="pt")
            kwargs = {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}
            for img in imgs:
                n = llm.mm.processor.num_tokens_for_size(img.height, img.width)
                text = text.replace("<image>", "<IMG>" * n, 1)
            text = text.replace("<IMG>", "<image>")
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = hf(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits[0, -1].double()
        ref = torch.log_softmax(logits, -1)
        assert r.token_id == int(ref.argmax())
        for t in r.top_logprobs:
            assert abs(t.logprob - float(ref[t.token_id])) < 1e-4
        two = torch.softmax(logits[[yes, no]], -1)
        assert abs(c.probs["yes"] - float(two[0])) <= 1e-4
    assert llm.model.encoder_stats.images_encoded == 3  # next_token encoded them; classify hit the cache
