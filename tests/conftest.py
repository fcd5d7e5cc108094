"""Shared fixtures: tiny random checkpoints of every supported architecture (built once per
session), their transformers references, the real Qwen3 tokenizer, and SmolLM2-135M-Instruct.
The builders and constants live in tiny_models.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny_models import TEST_DEVICE, TINY, HFRef, convert_smollm2, build_tiny, qwen_tokenizer_dir


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir())


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """tiny_path(name) -> directory of that tiny checkpoint, built on first use."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build_tiny(name, root / name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_llm(tiny_path):
    """tiny_llm(name, **kwargs) -> a float32 LLM on that checkpoint, on TEST_DEVICE (cached per kwargs)."""
    from prefillonly import LLM

    cache = {}

    def get(name: str, **kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            opts = {"dtype": "float32", "device": TEST_DEVICE, "use_tqdm": False, **kwargs}
            cache[key] = LLM(tiny_path(name), **opts)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hf_ref(tiny_path):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    cache = {}

    def get(name: str) -> HFRef:
        if name not in cache:
            path = tiny_path(name)
            kind = TINY[name].kind
            auto = {"causal": AutoModelForCausalLM, "seqcls": AutoModelForSequenceClassification,
                    "backbone": AutoModel}[kind]
            model = auto.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
            assert type(model).__name__ == TINY[name].model_class
            cache[name] = HFRef(model)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def smollm2_path(tmp_path_factory) -> Path:
    try:
        from prefillonly.default_model import default_model_path
    except ImportError:
        default_model_path = None
    if default_model_path is not None:
        return Path(default_model_path())
    return convert_smollm2(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")
