"""Fixtures of the VLM tests (the builders live in vlm_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .vlm_helpers import build_checkpoint


@pytest.fixture(scope="session")
def vl_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vlm")


_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def checkpoint(vl_root):
    def get(arch: str) -> Path:
        if arch not in _BUILT:
            _BUILT[arch] = build_checkpoint(arch, vl_root)
        return _BUILT[arch]

    return get


