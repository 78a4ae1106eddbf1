"""Shared fixtures: the tiny Phi-3 (built once per session) and small data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Phi-3 with a locally trained tokenizer (deterministic, ~3 s)."""
    from slmflow.tiny import build_tiny_phi3

    return build_tiny_phi3(tmp_path_factory.mktemp("tiny") / "tiny-phi3", seed=0)


@pytest.fixture
def write_jsonl(tmp_path: Path):
    """Write rows (dicts or raw strings) to a .jsonl file under tmp_path."""

    def write(rows: list, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write

