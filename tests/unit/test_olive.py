"""Olive configs: golden translations of the seed's blocks and an Olive 0.13 config, typos,
refusals, AzureML inputs and systems (offline), the join corpus strategy, and docs/olive.md's table."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from slmflow.configio import build_config, load_config
from slmflow.errors import ConfigError
from slmflow.olive import check_runnable, is_olive_config, olive_reference, origins, translate_olive

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets" / "olive"
TEMPLATE = "### Text: {phrase}\n### The tone is:\n{tone}"


def asset(name: str) -> dict:
    return json.loads((ASSETS / f"{name}.json").read_text())


def seed(**blocks) -> dict:
    """The seed's example config assembled from its blocks, with the named blocks swapped in."""
    config = asset("seed_full")
    config.update(copy.deepcopy(blocks))
    return config


def local_engine() -> dict:
    """The seed's engine block without the AzureML host/target (how to run it here)."""
    return {k: v for k, v in asset("seed_engine")["engine"].items() if k not in ("host", "target")}


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory with the seed's relative data file (the bundled tone rows)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dataset").mkdir()
    (tmp_path / "data").mkdir()
    tones = REPO / "src" / "slmflow" / "data" / "tones_small.jsonl"
    shutil.copy(tones, tmp_path / "dataset" / "dataset-classification.json")
    shutil.copy(tones, tmp_path / "data" / "train.jsonl")
    shutil.copy(REPO / "tests" / "assets" / "tones_other.jsonl", tmp_path / "data" / "eval.jsonl")
    return tmp_path


def write(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config, indent=2))
    return path


SEED_DATA = {
    "train_file": "dataset/dataset-classification.json",
    "text_columns": ["phrase", "tone"],
    "text_template": TEMPLATE,
    "label_column": "tone",
    "corpus_strategy": "join",
    "max_seq_len": 2048,
    "eval_split": 0.3,
    "seed": 42,
}
SEED_FINETUNE = {
    "method": "qlora", "target_modules": ["o_proj", "qkv_proj"], "double_quant": True, "r": 64,
    "alpha": 64, "dropout": 0.1, "seed": 0, "batch_size": 1, "gradient_accumulation_steps": 4,
    "gradient_checkpointing": False, "learning_rate": 1e-4, "epochs": 3, "max_steps": 10,
    "group_by_length": True, "adam_beta2": 0.999, "max_grad_norm": 0.3, "device": "auto",
}
SEED_FULL = {
    "model": {"source": "hf", "name_or_path": "model-cache/microsoft/phi-3-mini",
              "trust_remote_code": True},
    "data": SEED_DATA,
    "finetune": SEED_FINETUNE,
    "export": {"precision": "int4", "execution_provider": "cuda"},
    "output_dir": "../model-cache/models/phi3-finetuned",
    "cache_dir": "../model-cache/models/phi3-finetuned/cache",
}


# ---- golden translations -----------------------------------------------------------------------
def test_seed_example_config_translates_to_the_golden_dict(workdir):
    out, notes = translate_olive(asset("seed_full"), "seed_full.json")
    assert out == SEED_FULL
    assert build_config(out).finetune.method == "qlora"  # the dict is a valid slmflow config
    by_key = {n.olive_key: n.became for n in notes}
    assert "finetune.alpha = 64" in by_key["passes.lora.config.lora_alpha"]
    assert "double_quant: true in a LoRA pass: QLoRA" in by_key["passes.lora.type"]
    assert "data.labels: slmflow's default" in by_key[
        "data_configs[0].load_dataset_config.params.data_files"]
    assert by_key["engine.search_strategy"].startswith("noted: ")
    assert by_key["engine.log_severity_level"].startswith("noted: ")
    assert "label is the template's last placeholder" in by_key[
        "data_configs[0].pre_process_data_config.params.text_template"]


def _leaves(node, path=""):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{path}[{i}]")
    else:
        yield path


@pytest.mark.parametrize("name", ["seed_full", "olive013"])
def test_every_olive_key_gets_a_note(workdir, name):
    _, notes = translate_olive(asset(name), name)
    keys = {n.olive_key for n in notes}
    silent = [leaf for leaf in _leaves(asset(name))
              if not any(leaf == k or leaf.startswith((k + ".", k + "["))
                         for k in keys)]
    assert not silent, f"keys without a note: {silent}"


def test_seed_local_data_block(workdir):
    out, _ = translate_olive(seed(data_configs=asset("seed_data_local")["data_configs"]))
    assert out["data"] == SEED_DATA


def test_seed_azureml_data_block_translates_to_a_datastore_file(workdir):
    out, notes = translate_olive(seed(data_configs=asset("seed_data_azureml")["data_configs"]))
    assert out["data"] == {
        "train_file": "azureml://subscriptions/Your Azure Subscrition ID/resourcegroups/Your Azure "
                      "Resource Group/workspaces/Your Azure ML Workspaces name/datastores/"
                      "workspaceblobstore/paths/Your train_data.json Azure ML Location",
        "text_columns": ["Question", "Best Answer"],
        "text_template": "<|user|>\n{Question}<|end|>\n<|assistant|>\n{Best Answer}\n<|end|>",
        "label_column": "Best Answer",
        "corpus_strategy": "join", "max_seq_len": 2048, "eval_split": 0.3, "seed": 42,
    }
    note = next(n for n in notes if n.olive_key.endswith("data_files"))
    assert "downloaded into the stage store" in note.became and not note.blocker


def test_seed_local_model_block(workdir):
    out, _ = translate_olive(seed(input_model=asset("seed_model_local")["input_model"]))
    assert out["model"] == SEED_FULL["model"]


def test_seed_registry_model_block(workdir):
    out, notes = translate_olive(seed(input_model=asset("seed_model_registry")["input_model"]))
    assert out["model"] == {"source": "azureml_registry", "name_or_path":
                            "microsoft/Phi-3-mini-4k-instruct", "registry_name": "azureml-msr",
                            "version": "11", "trust_remote_code": True}
    by_key = {n.olive_key: n for n in notes}
    assert not by_key["input_model.config.model_path"].blocker
    assert "downloaded from the registry" in by_key["input_model.config.model_path"].became
    assert by_key["input_model.config.model_file_format"].became.startswith("noted: ")
    assert "comes from model_path" in by_key["input_model.config.hf_config.model_name"].became


def test_seed_lora_pass_block(workdir):
    passes = {**asset("seed_lora_pass"), **asset("seed_merge_builder")}
    out, _ = translate_olive(seed(passes=passes))
    assert out["finetune"] == SEED_FINETUNE
    assert (out["data"]["eval_split"], out["data"]["seed"]) == (0.3, 42)


def test_seed_lora_pass_without_double_quant_is_lora(workdir):
    passes = {**asset("seed_lora_pass"), **asset("seed_merge_builder")}
    del passes["lora"]["config"]["double_quant"]
    out, _ = translate_olive(seed(passes=passes))
    assert out["finetune"]["method"] == "lora" and "double_quant" not in out["finetune"]


def test_seed_merge_and_builder_block(workdir):
    out, notes = translate_olive(seed(passes={**asset("seed_lora_pass"),
                                              **asset("seed_merge_builder")}))
    assert out["export"] == {"precision": "int4", "execution_provider": "cuda"}
    by_key = {n.olive_key: n.became for n in notes}
    assert "algo_config k_quant," in by_key["passes.builder.config.precision"]
    assert by_key["passes.merge_adapter_weights.type"].startswith("merge")


def test_seed_systems_and_engine_blocks(workdir):
    out, notes = translate_olive(seed(**asset("seed_systems"), **asset("seed_engine")))
    assert (out["output_dir"], out["cache_dir"]) == (SEED_FULL["output_dir"], SEED_FULL["cache_dir"])
    assert out["export"]["execution_provider"] == "cuda" and out["finetune"]["device"] == "auto"
    blocked = sorted(n.olive_key for n in notes if n.blocker)
    assert blocked == ["engine.host", "engine.target"]
    aml = [n for n in notes if n.olive_key.startswith("systems.")]
    assert len(aml) == 9 and all("runs on AzureML through its azureml" in n.became for n in aml)


def test_olive_013_config_translates_to_the_golden_dict(workdir):
    out, notes = translate_olive(asset("olive013"), "olive013.json")
    assert out == {
        "model": {"source": "hf", "name_or_path": "models/phi-3-mini", "trust_remote_code": False},
        "finetune": {
            "method": "qlora", "r": 16, "alpha": 32, "dropout": 0.0,
            "target_modules": ["qkv_proj", "o_proj"], "quant_type": "nf4", "double_quant": True,
            "compute_dtype": "float32", "seed": 0, "batch_size": 16,
            "gradient_accumulation_steps": 1, "learning_rate": 0.005, "max_steps": 20,
            "lr_scheduler": "linear", "warmup_steps": 2, "gradient_checkpointing": False,
            "checkpoint_every": 10,
        },
        "data": {
            "train_file": "data/train.jsonl", "eval_file": "data/eval.jsonl",
            "text_columns": ["phrase", "tone"], "text_template": TEMPLATE, "label_column": "tone",
            "corpus_strategy": "line_by_line", "max_seq_len": 256,
        },
        "export": {"precision": "int4", "algo_config": "k_quant_mixed", "block_size": 32,
                   "execution_provider": "cpu"},
        "output_dir": "out/phi3-tones",
        "cache_dir": "out/phi3-tones/cache",
    }
    assert not any(n.blocker for n in notes)
    build_config(out)


def test_load_config_translates_and_applies_overrides_in_slmflow_names(workdir):
    path = write(workdir / "olive-config.json", asset("olive013"))
    config = load_config(path, ["finetune.max_steps=5", "evaluate.max_accuracy_drop=1.0"])
    assert config.finetune.max_steps == 5 and config.finetune.method == "qlora"
    assert config.evaluate.max_accuracy_drop == 1.0
    assert any(n.startswith("passes.qlora.alpha: 32 → finetune.alpha = 32") for n in config.notes)
    assert config.model_dump(mode="json")["notes"] == config.notes  # report.json's config section


def test_labels_are_the_distinct_values_of_the_label_column(workdir):
    rows = [{"text": f"row {i}", "sentiment": ["positive", "negative"][i % 2]} for i in range(8)]
    (workdir / "dataset" / "reviews.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data_configs = asset("seed_data_local")["data_configs"]
    params = data_configs[0]["pre_process_data_config"]["params"]
    params.update(text_cols=["text", "sentiment"], text_template="{text} => {sentiment}")
    data_configs[0]["load_dataset_config"]["params"]["data_files"] = "dataset/reviews.jsonl"
    out, _ = translate_olive(seed(data_configs=data_configs))
    assert out["data"]["labels"] == ["positive", "negative"]
    assert out["data"]["label_column"] == "sentiment"


def test_free_text_label_column_is_refused(workdir):
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(60)]
    (workdir / "dataset" / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data_configs = asset("seed_data_local")["data_configs"]
    data_configs[0]["pre_process_data_config"]["params"].update(text_cols=["q", "a"],
                                                                text_template="{q}\n{a}")
    data_configs[0]["load_dataset_config"]["params"]["data_files"] = "dataset/qa.jsonl"
    with pytest.raises(ConfigError, match=r"text_template: the label column 'a' .* has 60 distinct "
                                          r"values .*slmflow fine-tunes classifiers"):
        translate_olive(seed(data_configs=data_configs))


def test_missing_data_file_keeps_default_labels_with_a_note(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, notes = translate_olive(asset("seed_full"))
    assert "labels" not in out["data"]
    note = next(n for n in notes if n.olive_key.endswith("data_files"))
    assert "could not read the file" in note.became


# ---- typos, refusals, references ---------------------------------------------------------------
def _edit(config: dict, dotted: str, value=None, delete: str | None = None) -> dict:
    node = config
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if delete:
        node[delete] = node.pop(last)
    else:
        node[last] = value
    return config


@pytest.mark.parametrize("dotted, new, match", [
    ("passes.lora.config.lora_r", "lora_rr",
     r"passes\.lora\.config\.lora_rr: unknown Olive key 'lora_rr'; did you mean 'lora_r'\?"),
    ("passes.lora.config.training_args.learning_rate", "learning_rat",
     r"training_args\.learning_rat: unknown Olive key 'learning_rat'; did you mean 'learning_rate'"),
    ("engine.output_dir", "output_dri", r"engine\.output_dri: .*did you mean 'output_dir'\?"),
    ("input_model", "input_modle", r"input_modle: unknown Olive key .*did you mean 'input_model'\?"),
    ("data_configs.0.pre_process_data_config.params.text_cols", "text_colls",
     r"data_configs\[0\]\.pre_process_data_config\.params\.text_colls: .*did you mean 'text_cols'"),
    ("data_configs.0.load_dataset_config.params.data_files", "data_file",
     r"did you mean 'data_files'\?"),
])
def test_typos_name_the_nearest_valid_olive_key(workdir, dotted, new, match):
    with pytest.raises(ConfigError, match=match):
        translate_olive(_edit(asset("seed_full"), dotted, delete=new), "cfg")


@pytest.mark.parametrize("dotted, value, match", [
    ("passes.lora.type", "LoRAA", r"passes\.lora\.type: unknown pass type 'LoRAA'; did you mean 'LoRA'"),
    ("engine.execution_providers", ["CUDAExecutionProvidr"],
     r"unknown execution provider 'CUDAExecutionProvidr'; did you mean 'CUDAExecutionProvider'"),
    ("data_configs.0.pre_process_data_config.params.corpus_strategy", "joinn",
     r"unknown strategy 'joinn'; did you mean 'join'"),
    ("input_model.type", "PyTorchModl", r"unknown model type 'PyTorchModl'; did you mean 'PyTorchModel'"),
    ("systems.aml.type", "AzureMl", r"unknown system type 'AzureMl'; did you mean 'AzureML'"),
])
def test_typos_in_values_name_the_nearest_valid_value(workdir, dotted, value, match):
    with pytest.raises(ConfigError, match=match):
        translate_olive(_edit(asset("seed_full"), dotted, value), "cfg")


@pytest.mark.parametrize("dotted, value, match", [
    ("evaluators", {"common": {"metrics": []}}, r"evaluators: not supported: slmflow evaluates"),
    ("engine.search_strategy", {"execution_order": "joint"},
     r"engine\.search_strategy: not supported: slmflow runs each pass once"),
    ("passes.builder.type", "OnnxConversion", (r"passes\.builder\.type: not supported: the "
                                              r"OnnxConversion pass")),
    ("input_model.type", "ONNXModel", r"input_model\.type: not supported: .*not a ONNXModel"),
    ("data_configs.0.pre_process_data_config.params.corpus_strategy", "join-random",
     r"corpus_strategy: not supported: join-random"),
    ("data_configs.0.pre_process_data_config.params.dataset_type", "pair",
     r"dataset_type: not supported: dataset_type 'pair'"),
    ("passes.lora.config.bias", "all", (r"passes\.lora\.config\.bias: not supported: slmflow trains "
                                       r"no bias terms")),
    ("passes.lora.config.training_args.optim", "sgd", (r"optim: not supported: slmflow trains with "
                                                      r"AdamW")),
    ("passes.lora.config.eval_dataset_size", 30, r"eval_dataset_size: give a fraction"),
    ("passes.builder.config.precision", "bf16", r"precision: not supported: precision 'bf16'"),
    ("passes.builder.config.exclude_lm_head", True, r"exclude_lm_head: not supported"),
    ("engine.execution_providers", ["CUDAExecutionProvider", "CPUExecutionProvider"],
     r"not supported: 2 execution providers"),
    ("engine.execution_providers", ["QNNExecutionProvider"], r"not supported: QNNExecutionProvider"),
    ("systems.aml.type", "Docker", r"systems\.aml\.type: not supported: Docker systems"),
    ("passes.lora.config.r", 8, (r"passes\.lora\.config\.r: sets finetune\.r = 8, but "
                                r"passes\.lora\.config\.lora_r set it to 64; keep one of them")),
    ("input_model.config.adapter_path", "azureml://datastores/d/paths/a",
     r"input_model\.config\.adapter_path: expected the local folder of a PEFT LoRA adapter"),
    ("data_configs.0.load_dataset_config.params.split", "test",
     r"split: not supported: split 'test' of a local file"),
])
def test_unsupported_keys_are_refused_with_the_reason(workdir, dotted, value, match):
    with pytest.raises(ConfigError, match=match):
        translate_olive(_edit(asset("seed_full"), dotted, value), "cfg")


def test_pass_order_and_count_are_checked(workdir):
    config = asset("seed_full")
    config["passes"] = {"builder": config["passes"]["builder"], "lora": config["passes"]["lora"]}
    with pytest.raises(ConfigError, match=r"passes: slmflow runs fine-tune → merge → export; the "
                                          r"passes here are in another order"):
        translate_olive(config)
    config["passes"] = {"builder": config["passes"]["builder"]}
    with pytest.raises(ConfigError, match=r"passes: slmflow runs one LoRA or QLoRA pass, found 0"):
        translate_olive(config)


def test_dangling_train_data_config_names_the_nearest_data_config(workdir):
    config = _edit(asset("seed_full"), "passes.lora.config.train_data_config", "dataset_default_trian")
    with pytest.raises(ConfigError, match=r"passes\.lora\.config\.train_data_config: unknown data "
                                          r"config 'dataset_default_trian'; did you mean "
                                          r"'dataset_default_train'\?"):
        translate_olive(config, "cfg")


def test_dangling_system_reference_names_the_systems(workdir):
    with pytest.raises(ConfigError, match=r"engine\.target: unknown system 'am'; did you mean 'aml'"):
        translate_olive(_edit(asset("seed_full"), "engine.target", "am"))


def test_a_value_slmflow_rejects_names_the_olive_key_behind_it(workdir):
    config = _edit(asset("seed_full"), "passes.lora.config.training_args.lr_scheduler_type",
                   "constant_with_warmup")
    config["engine"] = local_engine()
    path = write(workdir / "olive.json", config)
    with pytest.raises(ConfigError, match=r"finetune\.lr_scheduler \(from Olive passes\.lora\.config"
                                          r"\.training_args\.lr_scheduler_type\): Input should be"):
        load_config(path)


# ---- wrong types: found by tests/unit/test_fuzz_configs.py (each crashed the translator) -------
def _olive013(*path, value) -> dict:
    config = asset("olive013")
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return config


def _both_data_configs(**params) -> dict:
    config = asset("olive013")
    for dc in config["data_configs"]:
        dc["pre_process_data_config"].update(params)
        if "text_template" not in params:
            del dc["pre_process_data_config"]["text_template"]
    return config


def _datastore_with_top_client(client) -> dict:
    """The seed's datastore block with its workspace given at the top level (azureml_client)."""
    config = seed(**asset("seed_data_azureml"), azureml_client=client)
    del config["data_configs"][0]["load_dataset_config"]["params"]["data_files"]["config"][
        "azureml_client"]
    return config


TRAINING = ("passes", "qlora", "training_args")
WRONG_TYPES = [  # (id, the minimal config that crashed, the message now)
    ("warmup-ratio-text", _olive013(*TRAINING, "warmup_ratio", value="0.1"),  # TypeError
     r"training_args\.warmup_ratio: give a fraction between 0 and 1 \(e\.g\. 0\.1\), got \"0\.1\""),
    ("warmup-ratio-huge", _olive013(*TRAINING, "warmup_ratio", value=1e308),  # OverflowError
     r"warmup_ratio: give a fraction between 0 and 1 .*got 1e\+308"),
    ("warmup-ratio-nan", _olive013(*TRAINING, "warmup_ratio", value=float("nan")),  # ValueError
     r"warmup_ratio: give a fraction between 0 and 1 .*got NaN"),
    ("input-model-config-not-mapping", seed(input_model={"type": "PyTorchModel", "config": 1}),
     r"input_model\.config: expected a mapping, got 1"),  # TypeError
    ("execution-providers-nested-list", _olive013("execution_providers",
                                                  value=[["CPUExecutionProvider"]]),
     r"execution_providers: expected execution provider names, e\.g\. \[\"CPUExecutionProvider\"\]"),
    ("execution-providers-mapping", _olive013("execution_providers", value={"a": 1}),  # KeyError
     r"execution_providers: expected execution provider names"),
    ("strategy-list", _both_data_configs(strategy=["join"], text_template=TEMPLATE),  # unhashable
     r"strategy: unknown strategy '\[\"join\"\]'; did you mean 'join'\?"),
    ("train-data-config-list", _olive013("passes", "qlora", "train_data_config",
                                         value=["tones_train"]),  # unhashable
     r"train_data_config: unknown data config '\[\"tones_train\"\]'; did you mean 'tones_train'"),
    ("target-list", _olive013("target", value=["local_system"]),  # unhashable
     r"target: unknown system '\[\"local_system\"\]'; did you mean 'local_system'"),
    ("azureml-client-not-mapping", _datastore_with_top_client([1]),  # AttributeError
     r"azureml_client: expected a mapping \(subscription_id, resource_group, workspace_name\)"),
    ("accelerator-providers-number", _olive013("systems", "local_system", "accelerators",
                                               value=[{"device": "cpu", "execution_providers": 5}]),
     r"accelerators\[0\]\.execution_providers: expected execution provider names.*got 5"),
    ("text-cols-empty", _both_data_configs(text_cols=[]),  # IndexError
     r"text_cols: expected a column name or a list of them, e\.g\. \[\"phrase\", \"tone\"\], got \[\]"),
    ("text-cols-numbers", _both_data_configs(text_cols=[1, 2]),  # TypeError
     r"text_cols: expected a column name or a list of them.*got \[1, 2\]"),
    ("builder-option-dotted", _olive013("passes", "builder", value={
        "type": "ModelBuilder", "int4_is_symmetric": True, "extra_options": {"is_symmetric.x": 1}}),
     r"extra_options\.is_symmetric\.x: a builder option is a name without dots"),
    ("yaml-number-key", {**asset("olive013"), 1: 1},  # YAML's 1: crashed nearest_key
     r": 1: unknown Olive key '1'; valid: "),
    ("data-name-a-path", _olive013("data_configs", 0, "load_dataset_config",
                                   value={"data_name": "/"}),  # hf:/ made datasets scan the disk
     r"data_name: expected json, csv, parquet or a Hugging Face dataset id \(NAME or ORG/NAME\), got '/'"),
]


@pytest.mark.parametrize("config, match", [c[1:] for c in WRONG_TYPES], ids=[c[0] for c in WRONG_TYPES])
def test_a_wrong_typed_olive_value_is_one_error_naming_the_key(workdir, config, match):
    with pytest.raises(ConfigError, match=match):
        translate_olive(config, "cfg")


def test_a_wrong_typed_max_steps_is_named_by_config_validation(workdir):
    """max_steps "ten" beside num_train_epochs crashed the epochs handler ('<=' on a str)."""
    config = _edit(seed(engine=local_engine()), "passes.lora.config.training_args.max_steps", "ten")
    with pytest.raises(ConfigError, match=r"finetune\.max_steps \(from Olive passes\.lora\.config\."
                                          r"training_args\.max_steps\): Input should be a valid integer"):
        load_config(write(workdir / "olive.json", config))


def test_a_yaml_date_is_shown_in_the_notes(workdir):
    """YAML reads 2024-01-01 as a date, which the notes' JSON could not show."""
    import datetime

    _, notes = translate_olive({**asset("olive013"), "workflow_id": datetime.date(2024, 1, 1)})
    shown = [str(n) for n in notes if n.olive_key == "workflow_id"]
    assert shown == [("workflow_id: \"2024-01-01\" → noted: Olive's run name; slmflow names a run "
                      "by output_dir")]


def test_the_translator_does_not_import_configio():
    """configio imports olive (load_config translates Olive configs), never the reverse."""
    import subprocess
    import sys

    code = "import sys, slmflow.olive; print('slmflow.configio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_not_an_olive_config():
    assert is_olive_config({"passes": {}}) and is_olive_config({"input_model": {}})
    assert not is_olive_config({"finetune": {"r": 8}})
    with pytest.raises(ConfigError, match=r"not an Olive config"):
        translate_olive({"finetune": {}})


# ---- AzureML, offline --------------------------------------------------------------------------
AZURE = (r"this Olive config asks to run on AzureML \({}\), so nothing was run: slmflow runs on "
         r"AzureML through its azureml Prefect work pool \(deployment slmflow-pipeline/azureml, see "
         r"infra/azureml/README\.md\), not through Olive systems; to run this config here, remove "
         r"{} or name a LocalSystem there")


def test_azureml_host_and_target_stop_the_run_before_any_work(workdir, capsys):
    from slmflow.cli import main

    path = write(workdir / "olive-config.json", asset("seed_full"))
    match = AZURE.format(r"engine\.host: AzureML system 'aml'; engine\.target: AzureML system 'aml'",
                         r"engine\.host and engine\.target")
    with pytest.raises(ConfigError, match=match):
        load_config(path)
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "slmflow-pipeline/azureml" in err
    assert not (workdir.parent / "model-cache").exists()


@pytest.mark.parametrize("where", ["workflow_host", "passes.lora.host", "engine.target"])
def test_any_key_that_runs_on_an_azureml_system_stops_the_run(workdir, where):
    config = seed(engine=local_engine())
    *parents, last = where.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = "azure_arc"
    _, notes = translate_olive(config)
    with pytest.raises(ConfigError, match=AZURE.format(rf"{where}: AzureML system 'azure_arc'",
                                                       where.replace(".", r"\."))):
        check_runnable(notes, "cfg")


def test_azureml_registry_model_translates_into_an_azureml_registry_source(workdir):
    config = seed(input_model=asset("seed_model_registry")["input_model"], engine=local_engine())
    config = load_config(write(workdir / "olive-config.json", config))
    assert (config.model.source, config.model.name_or_path, config.model.registry_name,
            config.model.version) == ("azureml_registry", "microsoft/Phi-3-mini-4k-instruct",
                                      "azureml-msr", "11")
    assert any(n.startswith("input_model.config.model_path: ") for n in config.notes)


def test_azureml_registry_uri_translates_into_its_parts(workdir):
    config = seed(engine=local_engine())
    config["input_model"]["config"]["model_path"] = (
        "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/15")
    out, notes = translate_olive(config)
    assert out["model"] == {"source": "azureml_registry", "name_or_path": "Phi-3-mini-4k-instruct",
                            "registry_name": "azureml", "version": "15", "trust_remote_code": True}
    check_runnable(notes)


def test_azureml_datastore_translates_into_a_datastore_file(workdir):
    config = seed(data_configs=asset("seed_data_azureml")["data_configs"], engine=local_engine())
    config = load_config(write(workdir / "olive-config.json", config))
    assert config.data.train_file.startswith(
        "azureml://subscriptions/Your Azure Subscrition ID/resourcegroups/")
    assert config.data.labels == ["Sad", "Joy", "Fear", "Surprise"]  # not read from the datastore


def test_azureml_datastore_without_a_client_is_the_short_form(workdir):
    data_configs = asset("seed_data_azureml")["data_configs"]
    files = data_configs[0]["load_dataset_config"]["params"]["data_files"]
    del files["config"]["azureml_client"]
    out, notes = translate_olive(seed(data_configs=data_configs, engine=local_engine()))
    assert out["data"]["train_file"] == ("azureml://datastores/workspaceblobstore/paths/Your "
                                         "train_data.json Azure ML Location")
    check_runnable(notes)


def test_convert_olive_shows_an_azureml_config(workdir, capsys):
    from slmflow.cli import main

    path = write(workdir / "olive-config.json", asset("seed_full"))
    assert main(["convert-olive", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model:\n  source: hf\n") and "corpus_strategy: join" in out
    assert "| passes.lora.config.lora_alpha | 64 | finetune.alpha = 64" in out
    assert "not runnable here: " in out and "slmflow-pipeline/azureml" in out
    assert "notes:" not in out


def test_the_seed_config_runs_locally_without_host_and_target(workdir):
    _, notes = translate_olive(seed(engine=local_engine()))
    check_runnable(notes)  # the unused AzureML systems are only noted
    assert origins(notes)["finetune.alpha"] == "passes.lora.config.lora_alpha"


# ---- the join corpus strategy ------------------------------------------------------------------
class _CharTokenizer:
    """One token per character, BOS 1 in front, EOS 2."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def test_join_chunks_concatenates_rows_with_eos_and_cuts_chunks():
    from slmflow.config import DataConfig
    from slmflow.stages.prepare_data import join_chunks

    cfg = DataConfig(text_columns=["t", "l"], text_template="{t}:{l}", label_column="l",
                     labels=["a", "b"], max_seq_len=16, corpus_strategy="join")
    rows = [{"t": "xyz", "l": "a"}, {"t": "hello", "l": "b"}, {"t": "q", "l": "a"}]
    chunks = join_chunks(rows, _CharTokenizer(), cfg, context=None)
    ids = [i for c in chunks for i in c["input_ids"]]
    assert ids == [1, *map(ord, "xyz:a"), 2, 1, *map(ord, "hello:b"), 2, 1, *map(ord, "q:a"), 2]
    assert [len(c["input_ids"]) for c in chunks] == [16, 5]  # the last shorter chunk is kept
    assert all(c["labels"] == c["input_ids"] for c in chunks)  # loss on every token
    capped = join_chunks(rows, _CharTokenizer(), cfg, context=10)
    assert [len(c["input_ids"]) for c in capped] == [10, 10]  # a 1-token chunk has no target


# ---- docs/olive.md -------------------------------------------------------------------------------
def test_docs_olive_table_is_current():
    assert olive_reference() in (REPO / "docs" / "olive.md").read_text(), (
        "docs/olive.md's table is stale: regenerate it with slmflow.olive.olive_reference()"
    )


# ---- ExtractAdapters: the adapter apart from the int4 base (export.adapters separate) ----------
def _with_extract(**config) -> dict:
    """The seed with Olive's multi-LoRA passes: LoRA, ModelBuilder, ExtractAdapters (no merge)."""
    olive = asset("seed_full")
    passes = {k: v for k, v in olive["passes"].items() if v["type"] != "MergeAdapterWeights"}
    olive["passes"] = passes | {"extract": {"type": "ExtractAdapters", "config": config}}
    return olive


def test_extract_adapters_translates_to_separate_adapters(workdir):
    out, notes = translate_olive(_with_extract(make_inputs=True, save_format="onnx_adapter",
                                               dynamic_lora_r=False), "cfg")
    assert out["export"]["adapters"] == "separate"
    config = build_config(out, source="cfg")
    assert config.export.adapters == "separate" and config.finetune.r == 64
    assert any(n.olive_key == "passes.extract.type" and "export.adapters" in n.became for n in notes)


@pytest.mark.parametrize(("config", "match"), [
    ({"save_format": "numpy"}, (r"save_format: not supported: slmflow writes onnxruntime's "
                                r"\.onnx_adapter files")),
    ({"make_inputs": False}, (r"make_inputs: not supported: slmflow makes the LoRA weights "
                              r"graph inputs")),
])
def test_extract_adapters_options_slmflow_cannot_honour_are_refused(workdir, config, match):
    with pytest.raises(ConfigError, match=match):
        translate_olive(_with_extract(**config), "cfg")


def test_merging_and_extracting_the_adapter_is_refused(workdir):
    olive = asset("seed_full")
    olive["passes"]["extract"] = {"type": "ExtractAdapters"}
    with pytest.raises(ConfigError, match=r"MergeAdapterWeights merges the adapter into the base "
                                          r"and ExtractAdapters keeps it apart: keep one of them"):
        translate_olive(olive, "cfg")


# ---- adapter_path: an adapter trained before; olive generate-adapter's workflow ---------------
def _given(passes: dict, **model) -> dict:
    """Olive 0.13's HfModel with a trained adapter, and `passes`."""
    return {"input_model": {"type": "HfModel", "model_path": "models/phi-3-mini",
                            "adapter_path": "adapters/tones", **model}, "passes": passes}


def test_adapter_path_is_a_given_adapter_merged_and_exported(workdir):
    out, notes = translate_olive(_given({"m": {"type": "MergeAdapterWeights"},
                                         "b": {"type": "ModelBuilder", "precision": "int4"}}), "cfg")
    assert out["finetune"] == {"adapter_path": "adapters/tones"}  # no method: nothing is trained
    assert "adapters" not in out.get("export", {})
    config = build_config(out, source="cfg")
    assert config.finetune.adapter_path == "adapters/tones" and config.export.adapters == "merged"
    [note] = [n for n in notes if n.olive_key == "input_model.adapter_path"]
    assert note.targets == ("finetune.adapter_path",) and "nothing trained" in note.became


def test_generate_adapter_workflow_translates_to_the_given_adapter_exported_separate(workdir):
    """What `olive generate-adapter --save_config_file` writes (its TEMPLATE, olive/cli/
    generate_adapter.py), with the ONNX model it reads replaced by what slmflow builds it from:
    the HfModel with its adapter_path, and a ModelBuilder pass."""
    olive = {
        "input_model": {"type": "HfModel", "model_path": "models/phi-3-mini",
                        "adapter_path": {"type": "folder", "path": "adapters/tones"}},
        "systems": {"local_system": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": {"b": {"type": "ModelBuilder", "precision": "int4"},
                   "e": {"type": "ExtractAdapters", "save_format": "onnx_adapter",
                         "adapter_type": "lora"}},
        "host": "local_system", "target": "local_system", "no_artifacts": True,
        "output_dir": "optimized-model", "log_severity_level": 3,
        "cache_config": {"account_name": None, "container_name": None},
    }
    out, _ = translate_olive(olive, "cfg")
    config = build_config(out, source="cfg")
    assert config.finetune.adapter_path == "adapters/tones"
    assert (config.export.adapters, config.export.precision) == ("separate", "int4")
    assert config.export.execution_provider == "cpu" and config.output_dir == "optimized-model"


def test_adapter_path_with_a_training_pass_is_refused_as_olive_refuses_it(workdir):
    with pytest.raises(ConfigError, match=r"cfg: passes\.lora\.type: not supported with "
                       r"input_model\.adapter_path: Olive's \"LoRA\" pass refuses an input model "
                       r"that has an adapter; drop adapter_path to train a new adapter, or drop "
                       r"this pass"):
        translate_olive(_given({"lora": {"type": "LoRA"}}), "cfg")
    olive = asset("seed_full")  # the seed's dialect: under config
    olive["input_model"]["config"]["adapter_path"] = "adapters/tones"
    with pytest.raises(ConfigError, match=r"passes\.lora\.type: not supported with "
                                          r"input_model\.config\.adapter_path"):
        translate_olive(olive, "cfg")


@pytest.mark.parametrize(("olive", "match"), [
    (_given({"b": {"type": "ModelBuilder"}}, adapter_path={"type": "azureml_datastore"}),
     r"adapter_path: not supported: adapter_path of type 'azureml_datastore'; give a local folder"),
    (_given({"e": {"type": "ExtractAdapters", "adapter_type": "loha"}}),
     r"passes\.e\.adapter_type: not supported: slmflow exports LoRA adapters only"),
    ({"input_model": {"type": "HfModel", "model_path": "m"}, "passes": {"b": {"type": "ModelBuilder"}}},
     (r"passes: slmflow runs one LoRA or QLoRA pass, found 0; .*or give a trained adapter: "
     r"input_model\.adapter_path, and no LoRA pass")),
    ({"input_model": {"type": "ONNXModel", "model_path": "m.onnx"},
      "passes": {"e": {"type": "ExtractAdapters"}}},
     (r"not a ONNXModel; for `olive generate-adapter`'s result, give the HfModel with its "
     r"adapter_path and a ModelBuilder and an ExtractAdapters pass")),
    (_given({"b": {"type": "ModelBuilder"}}) | {"cache_config": {"account_name": "acct"}},
     r"cache_config\.account_name: not supported: set slmflow's `cache_remote`"),
])
def test_adapter_configs_slmflow_cannot_honour_are_refused(workdir, olive, match):
    with pytest.raises(ConfigError, match=match):
        translate_olive(olive, "cfg")
