"""finetune.adapter_path: the given adapter's stage key (content, not path or training settings),
the trained adapters' keys left as they were, and what the report and the model card say."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from slmflow.artifacts import ArtifactRef, content_ref
from slmflow.config import FinetuneConfig, PipelineConfig
from slmflow.stages import finetune, given_adapter
from slmflow.store import Store

BASE = ArtifactRef(kind="base_model", uri="/base", sha256="b" * 64, key="b" * 24, meta={})


def _adapter(folder: Path, weights: bytes = b"w") -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def _key(folder: Path, store: Store, cfg: FinetuneConfig | None = None) -> str:
    source = content_ref("adapter_source", folder)
    return given_adapter.STAGE.key(cfg or FinetuneConfig(adapter_path=str(folder)), store,
                                   base=BASE, source=source)


def test_the_given_adapters_key_is_its_content(tmp_path):
    store = Store.at(tmp_path / "cache")
    first = _key(_adapter(tmp_path / "a"), store)
    moved = _key(_adapter(tmp_path / "elsewhere" / "a"), store)
    changed = _key(_adapter(tmp_path / "b", weights=b"v"), store)
    retuned = _key(tmp_path / "a", store, FinetuneConfig(adapter_path=str(tmp_path / "a"),
                                                         learning_rate=0.1, max_steps=5))
    assert first == moved == retuned  # the same adapter: cached, wherever it lies
    assert changed != first  # a changed adapter: a new key
    other_base = given_adapter.STAGE.key(FinetuneConfig(), store, base=BASE.model_copy(
        update={"sha256": "c" * 64}), source=content_ref("adapter_source", tmp_path / "a"))
    assert other_base != first  # checked against, and merged into, another base


def test_trained_adapters_keep_their_keys():
    assert "adapter_path" not in finetune.key_config(FinetuneConfig())


def test_report_and_card_say_the_adapter_was_given_not_trained(tmp_path):
    from slmflow.modelcard import build_card
    from slmflow.report import _training_section, training

    config = PipelineConfig(finetune={"adapter_path": "adapters/tones"})
    adapter = ArtifactRef(kind="adapter", uri=str(tmp_path), sha256="a" * 64, key="a" * 24,
                          meta={"given": {"sha256": "f" * 64, "peft_type": "LORA", "r": 4,
                                          "alpha": 8, "target_modules": ["o_proj", "qkv_proj"],
                                          "trained_on_base": "microsoft/Phi-3-mini-4k-instruct"}})
    report = training(config, adapter, [])
    assert report["given"]["adapter_path"] == "adapters/tones"
    assert "steps" not in report and report["loss_curve"] == []
    text = _training_section(report, "")
    assert text.startswith("## Fine-tune\n\nNo training: the adapter was given "
                           "(finetune.adapter_path `adapters/tones`, sha256 " + "f" * 64)
    card = build_card(config, {"adapter_source": {"uri": "/x", "sha256": "f" * 64}})
    assert card["given_adapter"] == {"adapter_path": "adapters/tones", "sha256": "f" * 64}
    assert build_card(PipelineConfig())["given_adapter"] is None


def test_the_stage_copies_the_adapter_and_refuses_one_changed_since_the_check(tmp_path):
    import pytest

    from slmflow.errors import StageCheckError
    from slmflow.stage import Workspace

    folder = _adapter(tmp_path / "a")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj"]}))
    source = content_ref("adapter_source", folder)
    out = tmp_path / "out"
    out.mkdir()
    meta = given_adapter.build(FinetuneConfig(), Workspace(out, tmp_path / "work", log=lambda m: None),
                               BASE, source)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                     "adapter_model.safetensors", "train_log.json"]
    assert meta["given"]["sha256"] == source.sha256 and meta["given"]["r"] == 4
    (folder / "adapter_model.safetensors").write_bytes(b"edited")
    shutil.rmtree(out)
    out.mkdir()
    with pytest.raises(StageCheckError, match=r"finetune\.adapter_path: .* changed since the run "
                                              r"checked it; run again"):
        given_adapter.build(FinetuneConfig(), Workspace(out, tmp_path / "work"), BASE, source)
