"""Read a checkpoint's image-processor settings (``preprocessor_config.json``)."""

from __future__ import annotations

import json
import os
from typing import Any

from prefillonly.errors import CheckpointError

__all__ = ["read_json_config", "read_image_processor_config"]


def read_image_processor_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Return ``preprocessor_config.json``, or the ``image_processor`` part of ``processor_config.json``."""
    model_dir = os.fspath(model_dir)
    path = os.path.join(model_dir, "preprocessor_config.json")
    if os.path.isfile(path):
        return read_json_config(path)
    alt = os.path.join(model_dir, "processor_config.json")
    if os.path.isfile(alt):
        cfg = read_json_config(alt)
        if isinstance(cfg.get("image_processor"), dict):
            return cfg["image_processor"]
    raise CheckpointError(f"{model_dir}: no preprocessor_config.json (needed to preprocess images)")


def read_json_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a JSON object, turning unreadable or malformed files into ``CheckpointError``."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{os.fspath(path)}: cannot read JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{os.fspath(path)}: expected a JSON object")
    return cfg
