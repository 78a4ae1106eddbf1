"""Config validation: every message names the key and the fix (pinned with match=)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmflow.config import PipelineConfig
from slmflow.configio import (
    apply_overrides,
    build_config,
    dump_config,
    load_config,
    read_config_file,
)
from slmflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_embedded_smollm2_run():
    cfg = PipelineConfig()
    assert cfg.model.source == "gguf" and "SmolLM2-135M-Instruct" in cfg.model.name_or_path
    assert cfg.data.text_template == "### Text: {phrase}\n### The tone is:\n{tone}"
    assert cfg.data.eval_split == 0.3
    assert cfg.evaluate.max_accuracy_drop == 0.02
    assert cfg.model.trust_remote_code is False


@pytest.mark.parametrize(
    "data, match",
    [
        ({"finetune": {"lora_r": 8}}, r"finetune\.lora_r: unknown key; did you mean 'r'\?"),
        ({"finetun": {}}, r"finetun: unknown key; did you mean 'finetune'\?"),
        ({"finetune": {"r": 0}}, r"finetune\.r: Input should be greater than or equal to 1"),
        ({"finetune": {"learning_rate": -1e-4}}, r"finetune\.learning_rate: Input should be greater than 0"),
        ({"data": {"eval_split": 1.5}}, r"data\.eval_split: Input should be less than 1"),
        ({"data": {"eval_split": 0}}, r"data\.eval_split: Input should be greater than 0"),
        ({"finetune": {"method": "dora"}}, r"finetune\.method: Input should be 'lora' or 'qlora' \(got 'dora'\)"),
        ({"export": {"precision": "int3"}}, r"export\.precision: Input should be 'int4', 'int8', 'fp16' or 'fp32'"),
        ({"export": {"execution_provider": "tpu"}}, r"export\.execution_provider: .*'cpu', 'cuda' or 'dml'"),
        ({"finetune": {"batch_size": "eight"}}, r"finetune\.batch_size: Input should be a valid integer"),
        ({"data": {"text_template": "{phrase} -> {mood}"}}, r"names \['mood'\] which are not in data\.text_columns"),
        ({"data": {"text_template": "{phrase}"}}, r"must contain the label column placeholder \{tone\}"),
        ({"data": {"labels": ["Sad", "Sad"]}}, r"data\.labels: labels must be distinct"),
        ({"model": {"source": "azureml_registry", "name_or_path": "phi"}}, r"needs model\.registry_name and model\.version"),
    ],
)
def test_bad_values_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        build_config(data)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        build_config({"finetune": {"r": 0, "learning_rate": 0}})
    assert "finetune.r" in str(err.value) and "finetune.learning_rate" in str(err.value)


def test_overrides_parse_yaml_scalars():
    data = apply_overrides({}, ["finetune.r=8", "finetune.learning_rate=1e-4", "output_dir=x",
                                "finetune.target_modules=[qkv_proj, o_proj]"])
    cfg = build_config(data)
    assert cfg.finetune.r == 8 and cfg.finetune.learning_rate == 1e-4
    assert cfg.finetune.target_modules == ["qkv_proj", "o_proj"] and cfg.output_dir == "x"


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        apply_overrides({}, ["finetune.r"])


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  r: 8\n  alpha: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        read_config_file(bad)


def test_json_syntax_error_has_line_and_column(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "finetune": {"r": 8,}\n}')
    with pytest.raises(ConfigError, match=r"bad\.json:2:\d+: invalid JSON"):
        read_config_file(bad)


@pytest.mark.parametrize(
    "content, match",
    [
        ("", r"is empty"),
        ("- a\n- b\n", r"top level must be a mapping"),
        (b"\xff\xfe r: 1", r"not UTF-8"),
    ],
)
def test_bad_config_files(tmp_path, content, match):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=match):
        read_config_file(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist: check the path"):
        load_config(tmp_path / "nope.yaml")


def test_dump_round_trips():
    cfg = load_config(None, ["finetune.r=4"])
    assert build_config(__import__("yaml").safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def _leaf_fields(model, prefix=""):
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_fields(ann, prefix + name + ".")
        else:
            yield prefix + name, field


def test_every_field_has_a_title_and_description_for_the_ui_form():
    missing = [name for name, f in _leaf_fields(PipelineConfig) if not (f.title and f.description)]
    assert not missing, missing


def test_readme_config_reference_is_current():
    from slmflow.configio import config_reference

    assert config_reference() in (REPO / "docs" / "config.md").read_text(), (
        "docs/config.md is stale: paste `slmflow show-config --reference` into it"
    )
