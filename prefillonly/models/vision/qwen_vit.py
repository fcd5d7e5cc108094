"""The Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers, in plain PyTorch.

All images of a step go through ONE call: their patches are concatenated with
no padding and attention runs per image (or per window, for Qwen2.5-VL's
window layers) through :func:`~prefillonly.models.attention.packed_attention`
with ``causal=False``. Module and parameter names follow transformers, so the
checkpoint's ``visual.*`` tensors load by name (Qwen2.5-VL's gate/up
projections are fused into ``gate_up_proj`` like the decoder's).

In half precision the residual stream between blocks stays in float32: the
matmuls, attention and MLP run in the model's dtype, each norm reads the
float32 stream and hands its output on in the model's dtype, and each block
adds its two outputs into the stream in place. transformers rounds the stream
to bfloat16 after every residual add; that rounding is about half of the
towers' bf16 error (Qwen2.5-VL-3B's 32 blocks: 2.2e-2 relative error of the
merged features against float32, 1.2e-2 with the float32 stream), so our bf16
features are closer to float32 than transformers' bf16. The cost is one
(patches, width) float32 tensor. In float32 nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError
from .. import flash, kernels
from ..attention import AttentionMeta, packed_attention, to_device
from ..layers import GatedMLP, RMSNorm, activation, apply_rotary

QWEN_VISION_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass
class QwenVisionSpec:
    kind: str  # one of QWEN_VISION_KINDS
    hidden_size: int
    num_heads: int
    depth: int
    intermediate_size: int
    activation: str
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    merge_size: int
    out_hidden_size: int
    rope_theta: float = 10000.0
    window_size: int | None = None  # Qwen2.5-VL
    fullatt_block_indexes: list[int] = field(default_factory=list)  # Qwen2.5-VL
    num_position_embeddings: int | None = None  # Qwen3-VL learned position grid
    deepstack_indexes: list[int] = field(default_factory=list)  # Qwen3-VL

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is None and isinstance(cfg, dict):
            value = cfg.get(name)
        if value is not None:
            return value
    return default


def qwen_vision_spec(config: Any, kind: str) -> QwenVisionSpec:
    """Read the vision tower's shape from a transformers config (5.17 or later; also 4-era keys)."""
    v = getattr(config, "vision_config", None)
    if v is None:
        raise CheckpointError("config.json: a vision-language checkpoint needs a vision_config")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = _get(v, "rope_parameters") or {}
    theta = float(rope.get("rope_theta", 10000.0)) if isinstance(rope, dict) else 10000.0
    common = dict(
        kind=kind,
        num_heads=int(_get(v, "num_heads", "num_attention_heads")),
        depth=int(_get(v, "depth", "num_hidden_layers")),
        patch_size=int(_get(v, "patch_size", "spatial_patch_size", default=14)),
        temporal_patch_size=int(_get(v, "temporal_patch_size", default=2)),
        in_channels=int(_get(v, "in_channels", "in_chans", default=3)),
        merge_size=int(_get(v, "spatial_merge_size", default=2)),
        rope_theta=theta,
    )
    if kind == "qwen2_vl":
        width = int(_get(v, "embed_dim"))
        return QwenVisionSpec(
            hidden_size=width,
            intermediate_size=int(width * float(_get(v, "mlp_ratio", default=4))),
            activation=_get(v, "hidden_act", default="quick_gelu"),
            # Qwen2-VL's vision_config.hidden_size is the LM width the merger projects to.
            out_hidden_size=int(_get(v, "hidden_size", default=text.hidden_size)),
            **common,
        )
    spec = QwenVisionSpec(
        hidden_size=int(_get(v, "hidden_size")),
        intermediate_size=int(_get(v, "intermediate_size")),
        activation=_get(v, "hidden_act", default="silu" if kind == "qwen2_5_vl" else "gelu_pytorch_tanh"),
        out_hidden_size=int(_get(v, "out_hidden_size", default=text.hidden_size)),
        **common,
    )
    if kind == "qwen2_5_vl":
        spec.window_size = int(_get(v, "window_size", default=112))
        spec.fullatt_block_indexes = [int(i) for i in _get(v, "fullatt_block_indexes", default=[])]
    elif kind == "qwen3_vl":
        spec.num_position_embeddings = int(_get(v, "num_position_embeddings"))
        spec.deepstack_indexes = [int(i) for i in _get(v, "deepstack_visual_indexes", default=[])]
    return spec


# --------------------------------------------------------------------------- layout helpers
#
# These run on the host for every tower call, in numpy: torch's CPU ops fan out over its OpenMP threads,
# which the image-preprocessing threads keep busy, and then one small op can stall the thread that feeds
# the GPU for milliseconds (measured: 136 ms of GPU idle in one pass of 96 mixed-size images). Each grid's
# layout is computed once and reused (a batch's images mostly share a few grids).


def _frozen(a: np.ndarray) -> np.ndarray:
    """A cached layout, read-only: callers concatenate copies of it and must never write to it."""
    a.setflags(write=False)
    return a


@lru_cache(maxsize=1024)
def _grid_block_positions(t: int, h: int, w: int, merge: int) -> np.ndarray:
    hpos = np.broadcast_to(np.arange(h)[:, None], (h, w))
    wpos = np.broadcast_to(np.arange(w)[None, :], (h, w))
    shape = (h // merge, merge, w // merge, merge)
    hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return _frozen(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))


def block_positions(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(P, 2) patch (row, col) in the processor's merge-block order, all images concatenated."""
    return torch.from_numpy(np.concatenate([_grid_block_positions(*g, merge) for g in grids]))


def window_layout(grids: list[tuple[int, int, int]], merge: int, window_size: int, patch_size: int):
    """Qwen2.5-VL windows: the merge-unit permutation and the window lengths (in patches)."""
    unit = merge * merge
    win = window_size // merge // patch_size
    index, lengths, base = [], [], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        idx = np.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = win - gh % win, win - gw % win
        nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
        padded = np.pad(idx, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
        counts = (padded != -100).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + base)
        lengths.extend(int(c) * unit for c in counts if c > 0)
        base += t * gh * gw
    return torch.from_numpy(np.concatenate(index)), lengths


@lru_cache(maxsize=1024)
def _grid_taps(t: int, h: int, w: int, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    pos = _grid_block_positions(t, h, w, merge)
    idx_axes, w_axes = [], []
    for axis, size in ((0, h), (1, w)):
        src = pos[:, axis].astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(src)
        offsets = np.arange(2, dtype=np.float32)
        taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
        weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets), 0, None)
        idx_axes.append(taps)
        w_axes.append(weights)
    indices = (idx_axes[0][:, :, None] * side + idx_axes[1][:, None, :]).reshape(-1, 4)
    weights = (w_axes[0][:, :, None] * w_axes[1][:, None, :]).reshape(-1, 4)
    return _frozen(indices), _frozen(weights.astype(np.float32))


def interpolation_taps(grids: list[tuple[int, int, int]], side: int, merge: int):
    """Bilinear (align_corners) taps into Qwen3-VL's square position table, in merge-block order."""
    taps = [_grid_taps(*g, side, merge) for g in grids]
    return (torch.from_numpy(np.concatenate([i for i, _ in taps])),
            torch.from_numpy(np.concatenate([w for _, w in taps])))


# --------------------------------------------------------------------------- modules


def _norm(mod: nn.Module, x: torch.Tensor, dtype: torch.dtype, delta: torch.Tensor | None = None,
          fused: bool = False) -> torch.Tensor:
    """``x += delta`` (when given) on the float32 residual stream ``x``, then ``mod(x)`` in the compute ``dtype``.

    RMSNorm rounds the normalised rows to ``dtype`` before the weight multiply,
    as transformers' Qwen2.5-VL RMSNorm does; LayerNorm rounds once at the end.
    With ``dtype`` float32 both are exactly the modules' own forward. ``fused``
    (CUDA, half precision) does the add and the norm in one Triton kernel.
    """
    if fused:
        layer = isinstance(mod, nn.LayerNorm)
        return kernels.add_norm(x, delta, mod.weight, mod.bias if layer else None, mod.eps, layer, dtype)
    if delta is not None:
        x.add_(delta)
    if isinstance(mod, nn.LayerNorm):
        w = None if mod.weight is None else mod.weight.float()
        b = None if mod.bias is None else mod.bias.float()
        return F.layer_norm(x.float(), mod.normalized_shape, w, b, mod.eps).to(dtype)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + mod.eps)
    return mod.weight * h.to(dtype)


class PatchEmbed(nn.Module):
    """transformers' Conv3d patch embedding, computed as the equivalent matmul on flat patches."""

    def __init__(self, spec: QwenVisionSpec, bias: bool) -> None:
        super().__init__()
        k = (spec.temporal_patch_size, spec.patch_size, spec.patch_size)
        self.proj = nn.Conv3d(spec.in_channels, spec.hidden_size, kernel_size=k, stride=k, bias=bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixels.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


# Fused towers run fc1's tanh-GELU in the matmul's epilogue (cuBLASLt), not as a pass over the 4x-wide output.
GELU_EPILOGUE = True


class FcMLP(nn.Module):
    """fc2(act(fc1(x))) with the checkpoint's own layer names."""

    def __init__(self, dim: int, hidden: int, act: str, names: tuple[str, str]) -> None:
        super().__init__()
        self.names = names
        setattr(self, names[0], nn.Linear(dim, hidden))
        setattr(self, names[1], nn.Linear(hidden, dim))
        self.act = activation(act)
        self.tanh_gelu = act in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        fc1, fc2 = getattr(self, self.names[0]), getattr(self, self.names[1])
        if fused and self.tanh_gelu and GELU_EPILOGUE and x.is_cuda and x.dim() == 2:
            # cuBLASLt's epilogue is the tanh form (the CPU kernel computes erf), on the float32 accumulator, then
            # one rounding: closer to float32 than the two-pass form (bench/NOTES.md #20)
            return fc2(torch._addmm_activation(fc1.bias, x, fc1.weight.t(), use_gelu=True))
        return fc2(self.act(fc1(x)))


class VisionAttention(nn.Module):
    def __init__(self, spec: QwenVisionSpec) -> None:
        super().__init__()
        self.heads, self.head_dim = spec.num_heads, spec.head_dim
        self.qkv = nn.Linear(spec.hidden_size, 3 * spec.hidden_size)
        self.proj = nn.Linear(spec.hidden_size, spec.hidden_size)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMeta,
                fused: bool = False) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x)
        # rotary in float32, as transformers does for the vision tower; fused: one kernel splits and rotates
        tower_flash = fused and flash.TOWER
        if fused:  # our flash kernel reads v in place, strided inside qkv
            q, k, v = kernels.qk_norm_rope(qkv, cos, sin, self.heads, self.heads, self.head_dim, None, None, 0.0,
                                           copy_v=not tower_flash)
        else:
            q, k, v = qkv.view(n, 3, self.heads, self.head_dim).unbind(1)
            q = apply_rotary(q.float(), cos, sin).to(v.dtype)
            k = apply_rotary(k.float(), cos, sin).to(v.dtype)
        if tower_flash:
            out = flash.flash_varlen(q, k, v, meta, self.scale, causal=False, config=flash.TOWER_CONFIG)
        else:
            out = packed_attention(q, k, v, meta, self.scale, causal=False)
        return self.proj(out.reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, spec: QwenVisionSpec) -> None:
        super().__init__()
        if spec.kind == "qwen2_5_vl":
            self.norm1 = RMSNorm(spec.hidden_size, 1e-6)
            self.norm2 = RMSNorm(spec.hidden_size, 1e-6)
            self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.activation, bias=True)
        else:
            self.norm1 = nn.LayerNorm(spec.hidden_size, eps=1e-6)
            self.norm2 = nn.LayerNorm(spec.hidden_size, eps=1e-6)
            names = ("fc1", "fc2") if spec.kind == "qwen2_vl" else ("linear_fc1", "linear_fc2")
            self.mlp = FcMLP(spec.hidden_size, spec.intermediate_size, spec.activation, names)
        self.attn = VisionAttention(spec)

    def forward(self, x, cos, sin, meta, pending: torch.Tensor | None = None,
                fused: bool = False) -> torch.Tensor:
        """x: the float32 residual stream, updated in place (the tower owns it); ``pending``: the previous
        block's MLP output, not yet added (the add rides in this block's first norm). Returns this block's
        MLP output, likewise not yet added to ``x``."""
        dtype = self.attn.qkv.weight.dtype
        attn = self.attn(_norm(self.norm1, x, dtype, pending, fused), cos, sin, meta, fused)
        return self.mlp(_norm(self.norm2, x, dtype, attn, fused), fused)


class Qwen2Merger(nn.Module):
    """Qwen2/2.5-VL patch merger: norm each patch, concat 2x2, MLP to the LM width."""

    def __init__(self, spec: QwenVisionSpec) -> None:
        super().__init__()
        self.width = spec.hidden_size * spec.merge_size**2
        if spec.kind == "qwen2_5_vl":
            self.ln_q = RMSNorm(spec.hidden_size, 1e-6)
        else:
            self.ln_q = nn.LayerNorm(spec.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, spec.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(_norm(self.ln_q, x, self.mlp[0].weight.dtype).view(-1, self.width))


class Qwen3Merger(nn.Module):
    """Qwen3-VL merger; ``postshuffle`` (the deepstack mergers) norms after the 2x2 concat."""

    def __init__(self, spec: QwenVisionSpec, postshuffle: bool) -> None:
        super().__init__()
        self.width = spec.hidden_size * spec.merge_size**2
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(self.width if postshuffle else spec.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.width, self.width)
        self.linear_fc2 = nn.Linear(self.width, spec.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.linear_fc1.weight.dtype
        if self.postshuffle:
            x = _norm(self.norm, x.view(-1, self.width), dtype)
        else:
            x = _norm(self.norm, x, dtype).view(-1, self.width)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class QwenVisionTower(nn.Module):
    """Pixels of many images -> merged image-token features (plus Qwen3-VL's deepstack features)."""

    def __init__(self, spec: QwenVisionSpec) -> None:
        super().__init__()
        if spec.kind not in QWEN_VISION_KINDS:
            raise ValueError(f"unknown Qwen vision kind {spec.kind!r}")
        self.spec = spec
        self.fused = False  # Triton kernels for the rotary and add+norm stages: set by engine.accel (CUDA, bf16/fp16)
        self.patch_embed = PatchEmbed(spec, bias=spec.kind == "qwen3_vl")
        if spec.kind == "qwen3_vl":
            self.pos_embed = nn.Embedding(spec.num_position_embeddings, spec.hidden_size)
            self.side = int(spec.num_position_embeddings**0.5)
        self.blocks = nn.ModuleList(VisionBlock(spec) for _ in range(spec.depth))
        if spec.kind == "qwen3_vl":
            self.merger = Qwen3Merger(spec, postshuffle=False)
            self.deepstack_merger_list = nn.ModuleList(Qwen3Merger(spec, True) for _ in spec.deepstack_indexes)
        else:
            self.merger = Qwen2Merger(spec)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def _rotary(self, grids, device):
        s = self.spec
        dim = s.head_dim // 2
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        pos = to_device(block_positions(grids, s.merge_size), device)
        freqs = (pos[..., None].float() * inv).flatten(1)  # (P, head_dim/2): h then w
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixels: (P, C*T*p*p) for all images in order; returns ((P/m^2, out), deepstack list)."""
        s = self.spec
        device = self.patch_embed.proj.weight.device
        # the residual stream in float32 (see the module docstring): a fresh tensor the blocks update in place
        x = self.patch_embed(pixels.to(device)).float()
        if s.kind == "qwen3_vl":
            idx, wts = interpolation_taps(grids, self.side, s.merge_size)
            pos = (self.pos_embed.weight[to_device(idx, device)] * to_device(wts, device)[:, :, None]).sum(1)
            x = x + pos.float()
        cos, sin = self._rotary(grids, device)
        frames = [h * w for t, h, w in grids for _ in range(t)]
        full = AttentionMeta.from_lengths(frames, device)
        window = order = None
        if s.kind == "qwen2_5_vl":
            order, lengths = window_layout(grids, s.merge_size, s.window_size, s.patch_size)
            window = AttentionMeta.from_lengths(lengths, device)
            unit = s.merge_size**2
            patch_order = to_device((order[:, None] * unit + torch.arange(unit)).flatten(), device)
            x, cos, sin = x[patch_order], cos[patch_order], sin[patch_order]
        deepstack = []
        pending = None
        for i, blk in enumerate(self.blocks):
            meta = window if window is not None and i not in s.fullatt_block_indexes else full
            pending = blk(x, cos, sin, meta, pending, self.fused)
            if i in s.deepstack_indexes:
                x.add_(pending)
                pending = None
                deepstack.append(self.deepstack_merger_list[s.deepstack_indexes.index(i)](x))
        if pending is not None:
            x.add_(pending)
        merged = self.merger(x)
        if order is not None:
            merged = merged[to_device(torch.argsort(order), device)]
        return merged, deepstack

    def encode(self, inputs: list[Any]) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        """Preprocessed images (``QwenImageInput``) -> per-image (features, deepstack features)."""
        grids = [tuple(int(g) for g in x.grid_thw) for x in inputs]
        pixels = torch.cat([x.pixel_values for x in inputs])
        merged, deepstack = self(pixels, grids)
        sizes = [t * h * w // self.spec.merge_size**2 for t, h, w in grids]
        mains = merged.split(sizes)
        levels = [d.split(sizes) for d in deepstack]
        return [(mains[i], tuple(level[i] for level in levels)) for i in range(len(inputs))]
