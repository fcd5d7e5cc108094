"""The building blocks of a pre-norm decoder, written out in plain PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import act_mul
from .spec import RopeSpec


class RMSNorm(nn.Module):
    """RMSNorm in both flavours: Llama's ``w * x`` and Gemma's ``(1 + w) * x``.

    The two round differently in half precision, so each follows its reference.
    """

    def __init__(self, dim: int, eps: float, gemma: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))
        self.eps = eps
        self.gemma = gemma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            return (h * (1.0 + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)


class Rotary(nn.Module):
    """Rotary position embedding computed for arbitrary (packed) position ids.

    ``positions`` is (N,) or, for M-RoPE models, (3, N): rows t, h, w. Each
    rotary frequency then takes its angle from the row its section names
    (concatenated sections for Qwen2/2.5-VL, interleaved for Qwen3-VL). For
    text tokens the three rows are equal, which is plain RoPE.
    """

    def __init__(self, rope: RopeSpec) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope.inv_freq.clone(), persistent=False)
        self.scaling = rope.attention_scaling
        self.mrope_section = rope.mrope_section
        self.mrope_interleaved = rope.mrope_interleaved

    def _freqs(self, positions: torch.Tensor) -> torch.Tensor:
        inv = self.inv_freq.float()
        if positions.dim() == 1:
            return positions[:, None].float() * inv[None, :]
        freqs = positions[..., None].float() * inv  # (3, N, D/2)
        section = self.mrope_section
        if section is None:
            return freqs[0]
        if self.mrope_interleaved:  # t h w t h w ... for the first 3*section[1] pairs, then t
            out = freqs[0].clone()
            for row in (1, 2):
                idx = slice(row, section[row] * 3, 3)
                out[:, idx] = freqs[row, :, idx]
            return out
        return torch.cat([chunk[i % 3] for i, chunk in enumerate(freqs.split(list(section), dim=-1))], dim=-1)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = self._freqs(positions)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, H, D); cos/sin: (N, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def activation(name: str):
    if name in ("silu", "swish"):
        return F.silu
    if name == "quick_gelu":
        return _quick_gelu
    if name == "relu":
        return F.relu
    if name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"hidden_act {name!r} is not supported")


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = activation(act)
        self.act_name = act
        self.intermediate = intermediate

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """``fused`` (CUDA, half precision; the vision towers): act(gate) * up in one Triton pass."""
        if fused:
            return self.down_proj(act_mul(self.gate_up_proj(x), self.act_name))
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(self.act(gate) * up)
