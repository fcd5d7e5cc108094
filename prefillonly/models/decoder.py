"""A pre-norm decoder over a packed token stream: Llama, Qwen2, Qwen3, Gemma 2/3.

The model returns hidden states *before* the final norm, for every token or,
when the step says which rows its task reads (``StepInput.tail``), for only
those: the last layer needs no other rows. Only those rows go through the
norm and the head. Nothing is cached between layers or steps.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import AttentionMeta, TailMeta, packed_attention, tail_attention
from .layers import GatedMLP, RMSNorm, Rotary, apply_rotary
from .spec import DecoderSpec


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int) -> None:
        super().__init__()
        self.spec = spec
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.qkv_proj = nn.Linear(spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, spec.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, spec.gemma_norm)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, spec.gemma_norm)
        self.rotary = Rotary(spec.layer_rope[layer])
        self.window = spec.layer_windows[layer]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMeta,
                tail: TailMeta | None = None) -> torch.Tensor:
        """Attention output of every row, or of the rows of ``tail`` only."""
        s = self.spec
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, s.num_heads, s.head_dim)
        k = k.view(-1, s.num_kv_heads, s.head_dim)
        v = v.view(-1, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rotary.cos_sin(positions, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if tail is None:
            out = packed_attention(q, k, v, meta, s.attn_scale, self.window, s.attn_softcap)
        else:
            out = tail_attention(q.index_select(0, tail.index), k, v, meta, tail, s.attn_scale, self.window,
                                 s.attn_softcap)
        return self.o_proj(out.reshape(-1, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int) -> None:
        super().__init__()
        eps, g = spec.rms_norm_eps, spec.gemma_norm
        self.self_attn = Attention(spec, layer)
        self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.activation, spec.mlp_bias)
        self.input_layernorm = RMSNorm(spec.hidden_size, eps, g)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, eps, g)
        self.sandwich = spec.sandwich_norm
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(spec.hidden_size, eps, g)
            self.post_feedforward_layernorm = RMSNorm(spec.hidden_size, eps, g)
        self.mlp_chunk: int | None = None  # hybrid prefilling: run the MLP in token chunks
        # CUDA half-precision fast path (models.fastpath.fused_layer_forward), set by fastpath.enable.
        self.fast = None

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp_chunk is None or x.shape[0] <= self.mlp_chunk:
            return self._mlp_block(x)
        out = torch.empty_like(x)
        for i in range(0, x.shape[0], self.mlp_chunk):
            out[i : i + self.mlp_chunk] = self._mlp_block(x[i : i + self.mlp_chunk])
        return out

    def _mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        if self.sandwich:
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMeta,
                tail: TailMeta | None = None) -> torch.Tensor:
        """The next hidden states of every row, or (the last layer) of the rows of ``tail`` only."""
        if self.fast is not None:
            return self.fast(self, x, positions, meta, tail)
        h = self.self_attn(self.input_layernorm(x), positions, meta, tail)
        if tail is not None:
            x = x.index_select(0, tail.index)
        if self.sandwich:
            h = self.post_attention_layernorm(h)
        return self._mlp(x + h)


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm (named as in transformers' ``model.``)."""

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.gemma_norm)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.spec.embed_scale is not None:
            h = h * torch.tensor(self.spec.embed_scale, dtype=h.dtype)
        return h

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMeta,
                tail: TailMeta | None = None) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, positions, meta, tail if i == last else None)
        return hidden


class CausalLM(nn.Module):
    """Decoder plus the output heads a checkpoint may carry (``lm_head``, ``score``)."""

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.score = nn.Linear(spec.hidden_size, spec.num_labels, bias=False) if spec.num_labels else None

    def hidden_states(self, step) -> torch.Tensor:
        """Pre-norm hidden states of a step (``engine.batch.StepInput``): of every packed token, or of the rows
        of ``step.tail`` when it is set."""
        return self.model(self.model.embed(step.input_ids), step.positions, step.meta, step.tail)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.norm(hidden)

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.spec.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def logits(self, normed: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """LM-head logits, for the whole vocabulary or only the rows ``token_ids``."""
        if self.lm_head is None:
            raise ValueError("this checkpoint has no LM head (lm_head.weight); use embed() with it")
        weight = self.lm_head.weight if token_ids is None else self.lm_head.weight[token_ids]
        return self.softcap(normed @ weight.t())
