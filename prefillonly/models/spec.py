"""One flat description of a decoder, read once from a Hugging Face config.

Every architecture we run is a pre-norm decoder; they differ in a handful of
switches (qk-norm, biases, Gemma's sandwich norms and soft-capping, sliding
windows). Reading those switches here keeps the layer code free of
``model_type`` checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CheckpointError


@dataclass(frozen=True)
class RopeSpec:
    """Inverse frequencies and output scale of one rotary embedding."""

    inv_freq: torch.Tensor
    attention_scaling: float = 1.0
    # M-RoPE (Qwen2/2.5/3-VL): rotary pairs split into (t, h, w) sections, each
    # rotated by its own row of (3, N) positions; Qwen3-VL interleaves them.
    mrope_section: tuple[int, ...] | None = None
    mrope_interleaved: bool = False


@dataclass
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    activation: str
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    gemma_norm: bool = False  # RMSNorm scales by (1 + w) and runs in float32
    sandwich_norm: bool = False  # extra pre/post feed-forward norms (Gemma 2/3)
    embed_scale: float | None = None  # Gemma multiplies embeddings by sqrt(hidden)
    attn_scale: float = 1.0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    layer_windows: list[int | None] = field(default_factory=list)  # sliding window per layer
    layer_rope: list[RopeSpec] = field(default_factory=list)  # rotary per layer
    num_labels: int | None = None  # set for *ForSequenceClassification checkpoints


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _mrope(config: Any) -> tuple[tuple[int, ...] | None, bool]:
    """M-RoPE sections (and whether they interleave), from rope_parameters or transformers 4's rope_scaling."""
    for name in ("rope_parameters", "rope_scaling"):
        entry = getattr(config, name, None)
        if isinstance(entry, dict) and entry.get("mrope_section"):
            section = tuple(int(x) for x in entry["mrope_section"])
            # transformers' Qwen3-VL always interleaves; others only when the config says so.
            interleaved = bool(entry.get("mrope_interleaved")) or str(getattr(config, "model_type", "")).startswith("qwen3_vl")
            return section, interleaved
    return None, False


def _rope_for(config: Any, layer_type: str | None, head_dim: int) -> RopeSpec:
    """Resolve rotary parameters the way transformers 5 does (``rope_parameters``)."""
    rope = _rope_base(config, layer_type, head_dim)
    section, interleaved = _mrope(config)
    if section is None:
        return rope
    if sum(section) != rope.inv_freq.numel():
        raise CheckpointError(
            f"config.json: mrope_section {list(section)} must sum to head_dim/2 = {rope.inv_freq.numel()}"
        )
    return RopeSpec(rope.inv_freq, rope.attention_scaling, section, interleaved)


def _rope_base(config: Any, layer_type: str | None, head_dim: int) -> RopeSpec:
    params = getattr(config, "rope_parameters", None) or {}
    per_type = layer_type is not None and isinstance(params.get(layer_type), dict)
    entry = params[layer_type] if per_type else params
    if not entry or "rope_theta" not in entry:
        # transformers 4 checkpoints keep rope_theta at the top level.
        theta = _get(config, "rope_theta", default=10000.0)
        entry = {"rope_type": "default", "rope_theta": theta, **(entry or {})}
    rope_type = entry.get("rope_type", entry.get("type", "default"))
    if rope_type == "mrope":  # transformers 4 spelling of default rotary with M-RoPE sections
        rope_type = "default"
    if rope_type == "default":
        base = float(entry["rope_theta"])
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return RopeSpec(inv_freq, 1.0)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise CheckpointError(f"config.json: rope_type {rope_type!r} is not supported")
    kwargs = {"layer_type": layer_type} if per_type else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)
    return RopeSpec(inv_freq.float().cpu(), float(scaling))


def spec_from_config(config: Any, family: str) -> DecoderSpec:
    """Build a :class:`DecoderSpec` from a transformers config of the given family."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = _get(text, "head_dim", default=hidden // heads)
    gemma = family in ("gemma2", "gemma3")
    layers = text.num_hidden_layers
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * layers
    window = getattr(text, "sliding_window", None)
    windows = [window if t == "sliding_attention" and window else None for t in layer_types]
    ropes = [_rope_for(text, t, head_dim) for t in layer_types]
    num_labels = None
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        num_labels = int(getattr(config, "num_labels", 2))
    return DecoderSpec(
        vocab_size=text.vocab_size,
        hidden_size=hidden,
        intermediate_size=text.intermediate_size,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_get(text, "num_key_value_heads", default=heads),
        head_dim=head_dim,
        rms_norm_eps=text.rms_norm_eps,
        activation=_get(text, "hidden_activation", "hidden_act", default="silu"),
        max_position_embeddings=_get(text, "max_position_embeddings", default=4096),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bool(getattr(text, "attention_bias", False)),
        o_bias=family != "qwen2" and bool(getattr(text, "attention_bias", False)),
        mlp_bias=bool(getattr(text, "mlp_bias", False)),
        qk_norm=family in ("qwen3", "gemma3"),
        gemma_norm=gemma,
        sandwich_norm=gemma,
        embed_scale=hidden**0.5 if gemma else None,
        attn_scale=(_get(text, "query_pre_attn_scalar", default=head_dim) if gemma else head_dim) ** -0.5,
        attn_softcap=getattr(text, "attn_logit_softcapping", None) if gemma else None,
        final_softcap=getattr(text, "final_logit_softcapping", None) if gemma else None,
        layer_windows=windows,
        layer_rope=ropes,
        num_labels=num_labels,
    )
