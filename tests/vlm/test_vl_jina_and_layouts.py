"""jina-reranker-m0's score head, and checkpoints saved in the other weight-name layout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import TEST_DEVICE

from prefillonly import LLM

from .vlm_helpers import MARKER, hf_inputs, hf_model, rand_image

IMGS = [rand_image(120, 70, 11), rand_image(50, 50, 12)]


@pytest.fixture(scope="module")
def jina(checkpoint, tmp_path_factory):
    src = checkpoint("qwen2_vl")
    path = tmp_path_factory.mktemp("jina") / "jina"
    shutil.copytree(src, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["JinaVLForRanking"]
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    head = {
        "score.0.weight": torch.randn(64, 64, generator=g) * 0.3,
        "score.0.bias": torch.randn(64, generator=g) * 0.1,
        "score.2.weight": torch.randn(1, 64, generator=g) * 0.3,
        "score.2.bias": torch.randn(1, generator=g),
    }
    tensors.update(head)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path, head


def test_jina_reranker_m0_score(jina):
    path, head = jina
    llm = LLM(path, dtype="float32", device=TEST_DEVICE, use_tqdm=False)
    hf = hf_model(path)
    tok = llm.tokenizer
    query = "red squares"
    docs = ["a document about squares", IMGS[0]]
    scores = llm.score(query, docs)
    image_query = llm.score({"image": IMGS[1]}, ["text doc"])
    cases = [
        (f"**Document**:\na document about squares\n**Query**:\n{query}", []),
        (f"**Document**:\n{MARKER}\n**Query**:\n{query}", [IMGS[0]]),
        (f"**Document**:\ntext doc\n**Query**:\n{MARKER}", [IMGS[1]]),
    ]
    for s, (text, images) in zip([*scores, *image_query], cases):
        assert s.error is None, s.error
        inp = hf_inputs(path, tok, text, images)
        inp["input_ids"] = torch.cat([inp["input_ids"], torch.tensor([[100]])], dim=1)
        inp["attention_mask"] = torch.ones_like(inp["input_ids"])
        inp["mm_token_type_ids"] = torch.cat([inp["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.int)], dim=1)
        with torch.no_grad():
            h = hf.model(**inp).last_hidden_state[0, -1]
            x = torch.relu(h @ head["score.0.weight"].T + head["score.0.bias"])
            ref = torch.sigmoid(x @ head["score.2.weight"].T + head["score.2.bias"] - 2.65)
        assert abs(s.score - float(ref)) <= 1e-4


def _relayout(src, dst, mapping):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    renamed = {}
    for k, v in tensors.items():
        for old, new in mapping:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        renamed[k] = v
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "arch,mapping",
    [
        # Qwen3-VL as transformers-4-era files lay it out (model.layers..., visual...)
        ("qwen3_vl", [("model.language_model.", "model."), ("model.visual.", "visual.")]),
        # Qwen2-VL in transformers 5's nested layout (model.language_model..., model.visual...)
        ("qwen2_vl", [("model.", "model.language_model."), ("visual.", "model.visual.")]),
    ],
)
def test_both_weight_layouts_load(checkpoint, tmp_path, arch, mapping):
    src = checkpoint(arch)
    other = _relayout(src, tmp_path / arch, mapping)
    prompt = [{"role": "user", "content": [{"type": "image", "image": IMGS[0]}, {"type": "text", "text": "hi"}]}]
    a = LLM(src, dtype="float32", device=TEST_DEVICE, use_tqdm=False).next_token(prompt, top_k=3)
    b = LLM(other, dtype="float32", device=TEST_DEVICE, use_tqdm=False).next_token(prompt, top_k=3)
    assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-6
