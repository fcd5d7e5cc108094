"""Load a checkpoint directory (config.json, safetensors, tokenizer) into our modules."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..models import CausalLM, spec_from_config, supported_architectures, text_family, vision_kind

# Our fused projections, and where each checkpoint tensor lands in them.
_PACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


@dataclass
class Checkpoint:
    path: Path
    config: Any
    family: str
    vision: str | None = None  # vision tower kind of a vision-language checkpoint


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local directory, or a hub id already present in the local HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"model: {model!s} is a file; pass the checkpoint directory that holds config.json")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception:
        raise CheckpointError(
            f"model: {model!s} is neither a local directory nor a hub id in the local Hugging Face cache; "
            "download it first or pass a checkpoint directory"
        ) from None


def read_checkpoint(model: str | os.PathLike) -> Checkpoint:
    path = resolve_model_path(model)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"model: {path} has no config.json")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"model: {cfg_file} is not valid JSON ({e})") from None
    archs = raw.get("architectures") or []
    family = text_family(archs)
    if family is None:
        raise CheckpointError(
            f"model: config.json architectures {archs} are not supported; supported: {', '.join(supported_architectures())}"
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"model: transformers could not read {cfg_file}: {e}") from None
    vision = vision_kind(archs)
    if vision == "llava_next":  # the LM inside LLaVA-NeXT is whatever text_config says
        text_type = getattr(config.get_text_config(), "model_type", "llama")
        family = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}.get(text_type)
        if family is None:
            raise CheckpointError(f"model: LLaVA-NeXT with a {text_type!r} language model is not supported")
    return Checkpoint(path, config, family, vision)


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"model: {path} has no *.safetensors weight files")
    return files


# Vision-language checkpoints: transformers 5 nests the decoder under ``model.language_model``
# and the tower under ``model.visual`` (Qwen3-VL, LLaVA-NeXT), while transformers-4-era files
# (and Qwen2/2.5-VL as transformers 5 still saves them) use ``model.layers`` and ``visual.``.
# LLaVA-NeXT's old layout is ``language_model.model.*`` / ``language_model.lm_head``.
_VL_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", "model."),  # a bare Qwen3VLModel backbone
    ("model.visual.", "visual."),
    ("model.vision_tower.", "vision.vision_tower."),
    ("vision_tower.", "vision.vision_tower."),
    ("model.multi_modal_projector.", "vision.multi_modal_projector."),
    ("multi_modal_projector.", "vision.multi_modal_projector."),
    ("model.image_newline", "vision.image_newline"),
    ("image_newline", "vision.image_newline"),
    ("score.0.", "score.dense."),  # jina-reranker-m0's nn.Sequential head
    ("score.2.", "score.out_proj."),
)
_VISION_ROOTS = ("visual.", "vision.")


def _vl_name(key: str) -> str:
    for old, new in _VL_PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    clip = "vision.vision_tower."
    if key.startswith(clip) and not key.startswith(clip + "vision_model."):
        key = clip + "vision_model." + key[len(clip):]  # CLIP saved without its vision_model level
    return key


def _target_name(key: str, vision: bool = False) -> tuple[str, int | None]:
    """Map a checkpoint tensor name to our parameter name and packed shard index."""
    if vision:
        key = _vl_name(key)
    if not key.startswith(("model.", "lm_head.", "score.")) and not (vision and key.startswith(_VISION_ROOTS)):
        key = "model." + key  # bare-backbone checkpoints (e.g. Qwen3-Embedding)
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in _PACKED:
            fused, shard = _PACKED[part]
            parts[i] = fused
            return ".".join(parts), shard
    return key, None


def load_model(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> CausalLM:
    from safetensors import safe_open

    spec = spec_from_config(ckpt.config, ckpt.family)
    info = None
    if ckpt.vision is not None:
        from ..models.vision import VisionLanguageModel, vision_info

        archs = getattr(ckpt.config, "architectures", None) or []
        info = vision_info(ckpt.config, ckpt.vision, archs)
        if info.score_head is not None:
            spec.num_labels = 1
    with torch.device("meta"):
        model = CausalLM(spec) if info is None else VisionLanguageModel(spec, info)
    params = dict(model.named_parameters())
    model.to_empty(device=device)
    model.to(dtype)
    # buffers (rotary frequencies) were lost on the meta device: rebuild them.
    for layer, rope in zip(model.model.layers, spec.layer_rope):
        layer.self_attn.rotary.inv_freq = rope.inv_freq.to(device)
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}
    for file in _weight_files(ckpt.path):
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:
            raise CheckpointError(f"model: {file} is not a readable safetensors file ({e})") from None
        with handle as f:
            for key in f.keys():
                name, shard = _target_name(key, info is not None)
                if name not in params:
                    continue  # e.g. rotary buffers some checkpoints carry
                try:
                    tensor = f.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"model: tensor {key} in {file} is corrupt ({e})") from None
                _copy_into(params[name], tensor, shard, name, spec, f"{key} in {file}")
                filled[name] = filled.get(name, 0) + 1
    _check_complete(model, params, filled, spec)
    return model.eval()


def _copy_into(param: torch.nn.Parameter, tensor: torch.Tensor, shard: int | None, name: str, spec,
               source: str | None = None) -> None:
    with torch.no_grad():
        if shard is None:
            target = param
        else:
            sizes = _shard_sizes(name, spec, param)
            start = sum(sizes[:shard])
            target = param.narrow(0, start, sizes[shard])
        if tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"model: tensor {source or name} has shape {tuple(tensor.shape)}, config.json implies {tuple(target.shape)}"
            )
        target.copy_(tensor.to(target.dtype))


def _shard_sizes(name: str, spec, param: torch.Tensor) -> list[int]:
    rows = param.shape[0]
    if not name.startswith("model."):  # vision towers: equal q/k/v, equal gate/up
        return [rows // 3] * 3 if "qkv_proj" in name else [rows // 2] * 2
    if "qkv_proj" in name:
        q = spec.num_heads * spec.head_dim
        kv = spec.num_kv_heads * spec.head_dim
        return [q, kv, kv]
    return [spec.intermediate_size, spec.intermediate_size]


def _check_complete(model: CausalLM, params: dict, filled: dict[str, int], spec) -> None:
    if "lm_head.weight" not in filled:
        if spec.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        else:
            model.lm_head = None  # a bare backbone (embedding checkpoint): no LM head to score with
        filled["lm_head.weight"] = 1
    missing = []
    for name, param in params.items():
        want = 3 if "qkv_proj.weight" in name or "qkv_proj.bias" in name else 2 if "gate_up_proj" in name else 1
        if filled.get(name, 0) < want:
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"model: checkpoint is missing {len(missing)} tensors: {shown}")
