"""Load a checkpoint directory (config.json, safetensors, tokenizer) into our modules."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..models import CausalLM, spec_from_config, supported_architectures, text_family

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
    return Checkpoint(path, config, family)


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"model: {path} has no *.safetensors weight files")
    return files


def _target_name(key: str) -> tuple[str, int | None]:
    """Map a checkpoint tensor name to our parameter name and packed shard index."""
    if not key.startswith(("model.", "lm_head.", "score.")):
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
    with torch.device("meta"):
        model = CausalLM(spec)
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
                name, shard = _target_name(key)
                if name not in params:
                    continue  # e.g. rotary buffers some checkpoints carry
                try:
                    tensor = f.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"model: tensor {key} in {file} is corrupt ({e})") from None
                _copy_into(params[name], tensor, shard, name, spec)
                filled[name] = filled.get(name, 0) + 1
    _check_complete(model, params, filled, spec)
    return model.eval()


def _copy_into(param: torch.nn.Parameter, tensor: torch.Tensor, shard: int | None, name: str, spec) -> None:
    with torch.no_grad():
        if shard is None:
            target = param
        else:
            sizes = _shard_sizes(name, spec)
            start = sum(sizes[:shard])
            target = param.narrow(0, start, sizes[shard])
        if tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"model: tensor for {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(target.shape)}"
            )
        target.copy_(tensor.to(target.dtype))


def _shard_sizes(name: str, spec) -> list[int]:
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
