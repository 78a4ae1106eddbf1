"""The translator's handlers for the Olive keys that need more than a copy (`Special` specs).

Each `_<name>(value, path, node)` reads one Olive key (`path`, inside the mapping `node`), sets
slmflow keys with `put`, and records one note. Mixed into `slmflow.olive._Translator`, which owns
`put`, `note`, `extend`, `error`, `unknown`, `walk` and `apply`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from slmflow import olive_keys as K
from slmflow.olive_keys import Map

REGISTRY_URI = re.compile(r"^azureml://registries/([^/]+)/models/([^/]+)/versions/([^/]+)$")


def show(value: Any, width: int = 60) -> str:
    """A value as short JSON, for notes and messages."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


class Handlers:
    # ---- model -----------------------------------------------------------------------------
    def _input_model(self, value: Any, path: str, node: dict) -> None:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping, got {show(value)}")
        self.model_node = {**value, **(value.get("config") or {})}
        self.walk(value, "INPUT_MODEL", path)

    def _model_type(self, value: Any, path: str, node: dict) -> None:
        kind = str(value).lower()
        if kind in ("pytorchmodel", "hfmodel"):
            self.note(path, value, "a transformers causal LM: model.source = \"hf\" (unless "
                                   "model_path names an AzureML registry model)")
        elif kind in (t.lower() for t in K.MODEL_TYPES):
            raise self.error(path, f"not supported: slmflow fine-tunes a transformers model "
                                   f"(PyTorchModel or HfModel), not a {value}")
        else:
            raise self.unknown(path, str(value), list(K.MODEL_TYPES), "model type")

    def _model_path(self, value: Any, path: str, node: dict) -> None:
        if isinstance(value, str) and value.startswith("azureml:"):
            match = REGISTRY_URI.match(value)
            if not match:
                raise self.error(path, "not supported: only AzureML registry models "
                                       "(azureml://registries/R/models/N/versions/V)")
            self._registry(*match.groups(), value, path)
        elif isinstance(value, str):
            self.note(path, value, self.put("model.name_or_path", value, path))
        elif isinstance(value, dict):
            conf = {**value, **(value.get("config") or {})}
            conf.pop("config", None)
            kind = conf.pop("type", None)
            if kind == "azureml_registry_model":
                for key in conf:
                    if key not in ("name", "registry_name", "version", "azureml_client"):
                        raise self.unknown(f"{path}.{key}", key, ["name", "registry_name", "version"])
                self._registry(conf.get("registry_name"), conf.get("name"), conf.get("version"),
                               value, path)
            elif kind in ("file", "folder", "string_name") and isinstance(conf.get("path"), str):
                self.note(path, value, self.put("model.name_or_path", conf["path"], path))
            else:
                raise self.error(path, f"not supported: model_path of type {kind!r}; use a hub id, "
                                       "a local folder or an azureml_registry_model")
        else:
            raise self.error(path, f"expected a hub id, a folder or a resource, got {show(value)}")

    def _registry(self, registry: Any, name: Any, version: Any, value: Any, path: str) -> None:
        became = "; ".join([self.put("model.source", "azureml_registry", path),
                            self.put("model.name_or_path", name, path),
                            self.put("model.registry_name", registry, path),
                            self.put("model.version", None if version is None else str(version),
                                     path)])
        self.note(path, value, f"the AzureML target: {became}",
                  blocker=f"{path}: registry model {registry}/{name}:{version}")

    def _hf_model_name(self, value: Any, path: str, node: dict) -> None:
        if "model_path" in self.model_node:
            self.note(path, value, "noted: the model's hub name; the model itself comes from "
                                   "model_path")
        else:
            self.note(path, value, self.put("model.name_or_path", value, path))

    def _task(self, value: Any, path: str, node: dict) -> None:
        if value not in (None, "text-generation", "text-generation-with-past"):
            raise self.error(path, f"not supported: task {value!r}; slmflow fine-tunes causal LMs "
                                   "(text-generation)")
        self.note(path, value, "noted: slmflow fine-tunes causal LMs (text-generation)")

    # ---- systems and engine ----------------------------------------------------------------
    def _systems(self, value: Any, path: str, node: dict) -> None:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping of named systems, got {show(value)}")
        for name, system in value.items():
            self.read_system(name, system, f"{path}.{name}")

    def read_system(self, name: str, system: Any, path: str) -> dict[str, Any]:
        if not isinstance(system, dict) or "type" not in system:
            raise self.error(path, "a system needs a type (LocalSystem or AzureML)")
        self.system = self.systems[name] = {"name": name, "type": system["type"], "eps": [],
                                            "path": path}
        self.walk(system, "SYSTEM", path)
        return self.system

    def _system_type(self, value: Any, path: str, node: dict) -> None:
        if value == "LocalSystem":
            self.note(path, value, "noted: this machine (slmflow runs here)")
        elif value == "AzureML":
            self.note(path, value, "the AzureML target (not in this build); a run stops where "
                                   "engine.host/target or a pass's host names this system")
        elif value in K.SYSTEM_TYPES:
            raise self.error(path, f"not supported: {value} systems; slmflow runs in its own "
                                   "environment (LocalSystem) or, later, on the AzureML target")
        else:
            raise self.unknown(path, str(value), list(K.SYSTEM_TYPES), "system type")
        self.system["type"] = value

    def _accelerators(self, value: Any, path: str, node: dict) -> None:
        if not isinstance(value, list):
            raise self.error(path, f"expected a list, got {show(value)}")
        for i, acc in enumerate(value):
            if isinstance(acc, dict):
                for key in acc:
                    if key not in ("device", "execution_providers", "memory"):
                        raise self.unknown(f"{path}[{i}].{key}", key, ["device", "execution_providers"])
                self.system["eps"] += acc.get("execution_providers") or []
        if self.system["type"] == "AzureML":
            self.note(path, value, "noted: a setting of the AzureML target (not in this build)")
        else:
            self.note(path, value, "noted: its execution_providers apply where engine.target "
                                   "names this system")

    def _aml_setting(self, value: Any, path: str, node: dict) -> None:
        if self.system.get("type") != "AzureML":
            raise self.error(path, "only AzureML systems take this key")
        self.note(path, value, "noted: a setting of the AzureML target (not in this build)")

    def _system_ref(self, value: Any, path: str, node: dict) -> None:
        if isinstance(value, dict):
            system = self.read_system(f"({path})", value, path)
        elif value in self.systems:
            system = self.systems[value]
        elif value is None:
            self.note(path, value, "noted: null: this machine")
            return
        else:
            raise self.unknown(path, str(value), list(self.systems), "system")
        if system["type"] == "AzureML":
            self.note(path, value, f"the AzureML target (system {system['name']!r})",
                      blocker=f"{path}: AzureML system {system['name']!r}")
        elif path.endswith("target") and system["eps"]:
            eps_path = f"{system['path']}.accelerators[].execution_providers (named by {path})"
            self.note(path, value, f"this machine; its execution_providers: "
                                   f"{self.providers(system['eps'], eps_path)}")
        else:
            self.note(path, value, "noted: this machine (LocalSystem)")

    def _execution_providers(self, value: Any, path: str, node: dict) -> None:
        if not value:
            self.note(path, value, "noted: empty: slmflow's default export.execution_provider")
        else:
            self.note(path, value, self.providers(value, path))

    def providers(self, value: Any, path: str) -> str:
        eps = value if isinstance(value, list) else [value]
        if len(set(eps)) > 1:
            raise self.error(path, f"not supported: {len(set(eps))} execution providers; slmflow "
                                   "exports for one (run once per provider)")
        ep = eps[0]
        if ep not in K.EXECUTION_PROVIDERS:
            if ep in K.OTHER_PROVIDERS:
                raise self.error(path, f"not supported: {ep}; slmflow exports for "
                                       f"{', '.join(K.EXECUTION_PROVIDERS)}")
            raise self.unknown(path, str(ep), [*K.EXECUTION_PROVIDERS, *K.OTHER_PROVIDERS],
                               "execution provider")
        became = [self.put("export.execution_provider", K.EXECUTION_PROVIDERS[ep], path)]
        if ep == "CUDAExecutionProvider":
            became.append(self.put("finetune.device", "auto", path) + " (CUDA when available)")
        return "; ".join(became)

    # ---- data ------------------------------------------------------------------------------
    def _data_configs(self, value: Any, path: str, node: dict) -> None:
        if not isinstance(value, list):
            raise self.error(path, f"expected a list of data configs, got {show(value)}")
        for i, dc in enumerate(value):
            name = dc.get("name") if isinstance(dc, dict) else None
            if not isinstance(name, str):
                raise self.error(f"{path}[{i}].name", "required: passes name a data config")
            if name in self.data_configs:
                raise self.error(f"{path}[{i}].name", f"{name!r} is used twice")
            self.data_configs[name] = (f"{path}[{i}]", dc)

    def data_ref(self, value: Any, path: str) -> tuple[str, dict]:
        if isinstance(value, dict):  # an inline data config (older Olive)
            return path, value
        if value not in self.data_configs:
            raise self.unknown(path, str(value), list(self.data_configs), "data config")
        self.used_data.add(value)
        return self.data_configs[value]

    def _train_data_config(self, value: Any, path: str, node: dict) -> None:
        where, dc = self.data_ref(value, path)
        self.note(path, value, f"the data config at {where} → data.*")
        self.walk(dc, "DATA_CONFIG", where)

    def _eval_data_config(self, value: Any, path: str, node: dict) -> None:
        if value is None:
            self.note(path, value, "noted: null: eval_split of the training data is held out")
            return
        where, dc = self.data_ref(value, path)
        self.note(path, value, f"the data config at {where} → data.eval_file (the same template)")
        self.eval_mode = True
        try:
            self.walk(dc, "DATA_CONFIG", where)
        finally:
            self.eval_mode = False

    def _eval_dataset_size(self, value: Any, path: str, node: dict) -> None:
        if value is not None and not (isinstance(value, int | float) and 0 < value < 1):
            raise self.error(path, f"give a fraction between 0 and 1 (e.g. 0.3), got {show(value)}")
        self.apply(Map("data.eval_split", "held out for evaluation"), "", value, path, node)

    def _data_type(self, value: Any, path: str, node: dict) -> None:
        if str(value).lower() != "huggingfacecontainer":
            raise self.error(path, f"not supported: {value}; slmflow reads files like "
                                   "HuggingfaceContainer (json/jsonl/csv/parquet or hf:NAME)")
        self.note(path, value, "noted: slmflow reads the data itself (.json/.jsonl/.csv/.parquet)")

    def _component_type(self, value: Any, path: str, node: dict) -> None:
        ok = (("huggingface_dataset",) if "load_dataset" in path else
              ("huggingface_pre_process", "text_generation_huggingface_pre_process"))
        if str(value).lower() not in ok:
            raise self.error(path, f"not supported: {value}; slmflow offers {', '.join(ok)}")
        self.note(path, value, "noted: slmflow's own loader / template rendering")

    def _data_name(self, value: Any, path: str, node: dict) -> None:
        if value in K.FILE_LOADERS:
            self.note(path, value, "noted: datasets' file loader; slmflow reads data_files itself")
        elif node.get("data_files") is not None:
            raise self.error(path, f"not supported: data_files with data_name {value!r}; use "
                                   "data_name json, csv or parquet for a file")
        else:
            self.note(path, value, self.put("data.train_file", f"hf:{value}", path))

    def _data_files(self, value: Any, path: str, node: dict) -> None:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, dict) and set(value) == {"train"}:
            value = value["train"]
        if isinstance(value, str) and value.startswith("azureml:"):
            self.note(path, value, f"the AzureML target: {self.put('data.train_file', value, path)}",
                      blocker=f"{path}: AzureML data {value}")
        elif isinstance(value, str):
            self.note(path, value, self.put("data.train_file", value, path))
        elif isinstance(value, dict) and value.get("type") == "azureml_datastore":
            self.note(path, value, "the AzureML target: " + self.put(
                "data.train_file", self.datastore_uri(value, path), path),
                blocker=f"{path}: AzureML datastore "
                        f"{(value.get('config') or value).get('datastore_name')}")
        else:
            raise self.error(path, "not supported: give one file (a path), or an "
                                   "azureml_datastore reference")

    def datastore_uri(self, value: dict, path: str) -> str:
        conf = {**value, **(value.get("config") or {})}
        valid = ["type", "config", "azureml_client", "datastore_name", "relative_path"]
        for key in conf:
            if key not in valid:
                raise self.unknown(f"{path}.config.{key}", key, valid)
        client = conf.get("azureml_client") or self.azureml_client
        store, rel = conf.get("datastore_name"), conf.get("relative_path")
        if not (store and rel):
            raise self.error(path, "an azureml_datastore needs datastore_name and relative_path")
        ws = ""
        if client:
            ws = (f"subscriptions/{client.get('subscription_id')}/resourcegroups/"
                  f"{client.get('resource_group')}/workspaces/{client.get('workspace_name')}/")
        return f"azureml://{ws}datastores/{store}/paths/{rel}"

    def _split(self, value: Any, path: str, node: dict) -> None:
        if node.get("data_name") in K.FILE_LOADERS or node.get("data_files") is not None:
            if value not in (None, "train"):
                raise self.error(path, f"not supported: split {value!r} of a local file; a file is "
                                       "one split (train); hold out eval rows with eval_dataset_size "
                                       "or give eval_data_config")
            self.note(path, value, "noted: a local file is one split")
        else:
            self.apply(Map("data.hf_split"), "", value, path, node)

    def _dataset_type(self, value: Any, path: str, node: dict) -> None:
        if value not in (None, "corpus"):
            raise self.error(path, f"not supported: dataset_type {value!r}; slmflow renders each "
                                   "row with text_template (corpus)")
        self.note(path, value, "noted: text from text_cols / text_template, as slmflow does")

    def _text_template(self, value: Any, path: str, node: dict) -> None:
        from slmflow.textformat import template_fields

        try:
            fields = template_fields(str(value))
        except ValueError as exc:
            raise self.error(path, f"not a valid template: {exc}") from None
        if not fields:
            raise self.error(path, "the template names no column; the last placeholder is the label")
        became = [self.put("data.text_template", value, path),
                  self.put("data.label_column", fields[-1], path)]
        if "text_cols" not in node:
            became.append(self.put("data.text_columns", fields, path))
        self.note(path, value, "; ".join(became) + " (the label is the template's last placeholder: "
                  "the model is prompted with the text before it and learns to answer with it)")

    def _strategy(self, value: Any, path: str, node: dict) -> None:
        if value in K.OTHER_STRATEGIES:
            raise self.error(path, f"not supported: {value}; slmflow offers join and line-by-line")
        if value not in K.STRATEGIES:
            raise self.unknown(path, str(value), [*K.STRATEGIES, *K.OTHER_STRATEGIES], "strategy")
        became = self.put("data.corpus_strategy", K.STRATEGIES[value], path)
        why = (" (rows joined by EOS and cut into max_seq_len chunks; loss on every token, as "
               "Olive)" if value == "join" else " (loss on the answer only, finetune.loss_on; "
               "Olive counts the whole text: --set finetune.loss_on=all for that)")
        self.note(path, value, became + why)

    # ---- passes ----------------------------------------------------------------------------
    def _passes(self, value: Any, path: str, node: dict) -> None:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping of named passes, got {show(value)}")
        for name, conf in value.items():
            ppath = f"{path}.{name}"
            if isinstance(conf, list):
                if len(conf) != 1:
                    raise self.error(ppath, "not supported: slmflow runs one configuration per pass")
                conf = conf[0]
            if not isinstance(conf, dict) or "type" not in conf:
                raise self.error(ppath, "a pass needs a type (LoRA, QLoRA, MergeAdapterWeights, "
                                        "ModelBuilder)")
            kind = self.pass_kind(conf["type"], f"{ppath}.type")
            self.passes.append((kind, f"{ppath}.type", conf["type"]))
            self.pass_type = kind
            table = {"lora": "LORA", "qlora": "LORA", "merge": "MERGE", "builder": "BUILDER"}[kind]
            self.walk(conf, table, ppath)

    def pass_kind(self, value: Any, path: str) -> str:
        kind = str(value).lower()
        if kind in K.FINETUNE_PASSES or kind in K.OTHER_PASSES:
            return K.FINETUNE_PASSES.get(kind) or K.OTHER_PASSES[kind]
        if kind in (t.lower() for t in K.PASS_TYPES):
            raise self.error(path, f"not supported: the {value} pass; slmflow runs LoRA or QLoRA, "
                                   "MergeAdapterWeights and ModelBuilder")
        raise self.unknown(path, str(value), list(K.PASS_TYPES), "pass type")

    def _pass_type(self, value: Any, path: str, node: dict) -> None:
        became = {"lora": "fine-tuning (finetune.*)", "qlora": "fine-tuning (finetune.*)",
                  "merge": "merge (into the full-precision base; merge.*)",
                  "builder": "export with onnxruntime-genai's model builder (export.*)"}
        self.note(path, value, became[self.pass_type])

    def _quant(self, value: Any, path: str, node: dict) -> None:
        key = path.rsplit(".", 1)[-1]
        if value is None:
            self.note(path, value, "noted: null: slmflow's default kept")
            return
        became = self.put(f"finetune.{key}", value, path)
        if self.pass_type == "lora" and (key != "double_quant" or value is True):
            self.qlora_by = self.qlora_by or f"{key}: {show(value)}"
            became += " (means QLoRA: finetune.method = \"qlora\")"
        self.note(path, value, became)

    def _epochs(self, value: Any, path: str, node: dict) -> None:
        became = self.put("finetune.epochs", value, path)
        if node.get("max_steps") is None or (node.get("max_steps") or 0) <= 0:
            became += "; " + self.put("finetune.max_steps", None, path) + " (the epochs decide)"
        else:
            became += " (max_steps wins, as in transformers)"
        self.note(path, value, became)

    def _warmup_ratio(self, value: Any, path: str, node: dict) -> None:
        if "warmup_steps" in node or not value:
            self.note(path, value, "noted: warmup_steps decides (as in transformers)")
        elif not isinstance(node.get("max_steps"), int) or node["max_steps"] <= 0:
            raise self.error(path, "not supported without max_steps: give warmup_steps instead")
        else:
            steps = K.warmup_steps(value, node["max_steps"])
            self.note(path, value, self.put("finetune.warmup_steps", steps, path))

    def _precision(self, value: Any, path: str, node: dict) -> None:
        if value not in ("int4", "int8", "fp16", "fp32"):
            raise self.error(path, f"not supported: precision {value!r}; slmflow exports int4, "
                                   "int8, fp16 or fp32")
        became = self.put("export.precision", value, path)
        if value in ("int4", "int8") and "int4_algo_config" not in node:
            became += (" (quantized with export.algo_config k_quant_mixed, slmflow's default: the "
                       "builder's RTN default lost 11.6 points here; int4_algo_config: default "
                       "gives Olive's)")
        self.note(path, value, became)

    def _builder_extra(self, value: Any, path: str, node: dict) -> None:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping of builder options, got {show(value)}")
        self.note(path, value, "; ".join(self.put(f"export.extra_options.{k}", v, path)
                                         for k, v in value.items()))
