"""Tests for slmflow.tiny: a deterministic tiny Phi-3 and its tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from slmflow import tiny

_ROWS = [
    {"phrase": "The movie was wonderful and I loved every minute.", "tone": "positive"},
    {"phrase": "This phone broke on the first day.", "tone": "negative"},
    {"phrase": "The meeting is scheduled for Monday at noon.", "tone": "neutral"},
    {"phrase": "Oh great, another delay. Just what I needed.", "tone": "sarcastic"},
] * 5


def _corpus(tmp: Path) -> list[Path] | None:
    """Use the package's corpus when it ships, else a small stand-in."""
    if tiny.DEFAULT_CORPUS.is_file():
        return None
    path = tmp / "tones.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _ROWS) + "\n", encoding="utf-8")
    return [path]


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    corpus = _corpus(root)
    return (
        tiny.build_tiny_phi3(root / "a", seed=0, corpus_files=corpus),
        tiny.build_tiny_phi3(root / "b", seed=0, corpus_files=corpus),
    )


def test_two_builds_are_byte_identical(builds: tuple[Path, Path]) -> None:
    a, b = builds
    assert tiny.is_complete(a)
    assert _digests(a) == _digests(b)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(_digests(a))
    assert not [p for p in a.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_existing_build_is_reused(builds: tuple[Path, Path]) -> None:
    a, _ = builds
    before = a.joinpath("model.safetensors").stat().st_mtime_ns
    assert tiny.build_tiny_phi3(a, seed=1) == a
    assert a.joinpath("model.safetensors").stat().st_mtime_ns == before


def test_model_has_lora_target_modules(builds: tuple[Path, Path]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    a, _ = builds
    config = AutoConfig.from_pretrained(a)
    assert config.model_type == "phi3"
    assert config.vocab_size == 1024 and config.hidden_size % 32 == 0
    assert config.max_position_embeddings == config.original_max_position_embeddings
    model = AutoModelForCausalLM.from_pretrained(a)
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"qkv_proj", "o_proj"} <= leaf_names


def test_tokenizer_round_trips_and_has_eos(builds: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    a, _ = builds
    tok = AutoTokenizer.from_pretrained(a)
    assert tok.eos_token == tiny.EOS_TOKEN and tok.eos_token_id is not None
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert len(tok) <= 1024
    text = tiny.TEMPLATE.format(phrase="Well, that went brilliantly — naïve me.", tone="sarcastic")
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.eos_token_id not in ids
    assert tok.decode(ids) == text
    assert len(tok.encode("\n", add_special_tokens=False)) == 1
