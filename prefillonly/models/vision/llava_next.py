"""LLaVA-NeXT's vision side: CLIP tower, projector, anyres tile packing with ``image_newline``.

Every tile of every image in a step goes through one batched CLIP call (all
tiles have the same size, so nothing is padded). Features come from
``vision_feature_layer`` (CLS dropped for the "default" strategy), are
projected to the LM width, then each image's tiles are stitched back into its
grid, the padding the preprocessor added is cut off ("unpad"), and one
``image_newline`` vector ends every feature row, exactly as transformers'
``pack_image_features``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError
from ..attention import to_device
from ..layers import activation


@dataclass
class LlavaNextSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    image_size: int
    num_channels: int
    layer_norm_eps: float
    activation: str
    text_hidden: int
    feature_layers: list[int]  # resolved to non-negative indices into CLIP's hidden_states
    select_strategy: str
    projector_act: str
    projector_bias: bool
    grid_pinpoints: list[list[int]] = field(default_factory=list)


def llava_next_spec(config: Any) -> LlavaNextSpec:
    v = config.vision_config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config.text_config
    if getattr(v, "model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        raise CheckpointError(f"config.json: LLaVA-NeXT with a {v.model_type} vision tower is not supported (CLIP only)")
    layers = int(v.num_hidden_layers)
    fl = getattr(config, "vision_feature_layer", -2)
    fl = [fl] if isinstance(fl, int) else list(fl)
    resolved = [i if i >= 0 else layers + 1 + i for i in fl]
    if any(not 0 <= i <= layers for i in resolved):
        raise CheckpointError(f"config.json: vision_feature_layer {fl} is out of range for {layers} CLIP layers")
    return LlavaNextSpec(
        hidden_size=int(v.hidden_size),
        intermediate_size=int(v.intermediate_size),
        num_layers=layers,
        num_heads=int(v.num_attention_heads),
        patch_size=int(v.patch_size),
        image_size=int(v.image_size),
        num_channels=int(getattr(v, "num_channels", 3)),
        layer_norm_eps=float(getattr(v, "layer_norm_eps", 1e-5)),
        activation=getattr(v, "hidden_act", "quick_gelu"),
        text_hidden=int(text.hidden_size),
        feature_layers=resolved,
        select_strategy=getattr(config, "vision_feature_select_strategy", "default"),
        projector_act=getattr(config, "projector_hidden_act", "gelu"),
        projector_bias=bool(getattr(config, "multimodal_projector_bias", True)),
        grid_pinpoints=[list(p) for p in (getattr(config, "image_grid_pinpoints", None) or [])],
    )


class ClipEmbeddings(nn.Module):
    def __init__(self, s: LlavaNextSpec) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(s.hidden_size))
        self.patch_embedding = nn.Conv2d(s.num_channels, s.hidden_size, s.patch_size, s.patch_size, bias=False)
        self.position_embedding = nn.Embedding((s.image_size // s.patch_size) ** 2 + 1, s.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixels.to(w.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


class ClipAttention(nn.Module):
    def __init__(self, s: LlavaNextSpec) -> None:
        super().__init__()
        self.heads, self.head_dim = s.num_heads, s.hidden_size // s.num_heads
        self.qkv_proj = nn.Linear(s.hidden_size, 3 * s.hidden_size)  # q_proj/k_proj/v_proj, fused at load
        self.out_proj = nn.Linear(s.hidden_size, s.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv_proj(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class ClipMLP(nn.Module):
    def __init__(self, s: LlavaNextSpec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(s.hidden_size, s.intermediate_size)
        self.fc2 = nn.Linear(s.intermediate_size, s.hidden_size)
        self.act = activation(s.activation)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, s: LlavaNextSpec) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.self_attn = ClipAttention(s)
        self.layer_norm2 = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.mlp = ClipMLP(s)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, s: LlavaNextSpec) -> None:
        super().__init__()
        # only the layers up to the deepest feature layer run (the rest are never loaded)
        self.layers = nn.ModuleList(ClipLayer(s) for _ in range(max(s.feature_layers)))


class ClipVisionModel(nn.Module):
    def __init__(self, s: LlavaNextSpec) -> None:
        super().__init__()
        self.embeddings = ClipEmbeddings(s)
        self.pre_layrnorm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.encoder = ClipEncoder(s)

    def forward(self, pixels: torch.Tensor, wanted: list[int]) -> list[torch.Tensor]:
        """hidden_states[i] for each i in ``wanted`` (0 = embeddings); layers past the last wanted one are skipped."""
        h = self.pre_layrnorm(self.embeddings(pixels))
        states = {0: h}
        for i, layer in enumerate(self.encoder.layers):
            h = layer(h)
            states[i + 1] = h
        return [states[i] for i in wanted]


class ClipVisionTower(nn.Module):
    """Named like transformers' CLIPVisionModel (``vision_model.*``)."""

    def __init__(self, s: LlavaNextSpec) -> None:
        super().__init__()
        self.vision_model = ClipVisionModel(s)


class Projector(nn.Module):
    def __init__(self, s: LlavaNextSpec) -> None:
        super().__init__()
        n = len(s.feature_layers)
        self.linear_1 = nn.Linear(s.hidden_size * n, s.text_hidden, bias=s.projector_bias)
        self.linear_2 = nn.Linear(s.text_hidden, s.text_hidden, bias=s.projector_bias)
        self.act = F.gelu if s.projector_act == "gelu" else activation(s.projector_act)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


def _best_resolution(size: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    from ...vision.llava_next_preprocess import select_best_resolution

    return select_best_resolution(size, pinpoints)


def _unpad(t: torch.Tensor, original: tuple[int, int]) -> torch.Tensor:
    """transformers' ``unpad_image`` on a (C, H, W) feature map."""
    oh, ow = original
    ch, cw = t.shape[1:]
    if ow / oh > cw / ch:
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return t[:, pad : ch - pad, :]
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return t[:, :, pad : cw - pad]


class LlavaNextVision(nn.Module):
    def __init__(self, spec: LlavaNextSpec) -> None:
        super().__init__()
        self.spec = spec
        self.vision_tower = ClipVisionTower(spec)
        self.multi_modal_projector = Projector(spec)
        self.image_newline = nn.Parameter(torch.empty(spec.text_hidden))

    def encode(self, inputs: list[Any]) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        """Preprocessed images (``LlavaNextImageInput``) -> per-image packed features (no deepstack)."""
        s = self.spec
        device = self.image_newline.device
        counts = [int(x.pixel_values.shape[0]) for x in inputs]
        pixels = to_device(torch.cat([x.pixel_values for x in inputs]), device)
        states = self.vision_tower.vision_model(pixels, s.feature_layers)
        feats = torch.cat(states, dim=-1) if len(states) > 1 else states[0]
        if s.select_strategy == "default":
            feats = feats[:, 1:]
        feats = self.multi_modal_projector(feats)
        side = s.image_size // s.patch_size
        out = []
        for x, tiles in zip(inputs, feats.split(counts)):
            size = tuple(int(v) for v in x.image_size)
            if tiles.shape[0] > 1:
                base, rest = tiles[0], tiles[1:]
                bh, bw = _best_resolution(size, s.grid_pinpoints)
                nph, npw = bh // s.image_size, bw // s.image_size
                grid = rest.view(nph, npw, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
                grid = _unpad(grid, size)
                newline = self.image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.dtype)
                grid = torch.cat((grid, newline), dim=-1).flatten(1, 2).transpose(0, 1)
                packed = torch.cat((base, grid), dim=0)
            else:
                packed = torch.cat((tiles[0], self.image_newline[None].to(tiles.dtype)), dim=0)
            out.append((packed, ()))
        return out
