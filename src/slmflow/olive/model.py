"""Olive's `input_model` → slmflow's `model.*`: a hub id, a local folder or an AzureML registry model.

The seed nests the model under `config` and `hf_config` (`model_name`, `model_loading_args`);
Olive 0.13 writes `HfModel` with `model_path` and `load_kwargs` flat.
"""

from __future__ import annotations

import re
from typing import Any

from slmflow.olive.core import (
    Map,
    Noted,
    Refused,
    Section,
    Special,
    Table,
    Translator,
    given,
    is_number,
    quoted,
    show,
)

REGISTRY_URI = re.compile(r"^azureml://registries/([^/]+)/models/([^/]+)/versions/([^/]+)$")
MODEL_TYPES = ("PyTorchModel", "HfModel", "ONNXModel", "CompositeModel", "DistributedHfModel",
               "OpenVINOModel", "QNNModel", "SNPEModel", "TensorFlowModel", "DiffusersModel")
REGISTRY_KEYS = ["name", "registry_name", "version"]


def handle_input_model(t: Translator, value: Any, path: str, node: dict) -> None:
    value = t.mapping(value, path)
    inner = value.get("config")
    t.model_node = {**value, **(inner if isinstance(inner, dict) else {})}
    t.walk(value, INPUT_MODEL, path)


def handle_model_type(t: Translator, value: Any, path: str, node: dict) -> None:
    kind = str(value).lower()
    if kind in ("pytorchmodel", "hfmodel"):
        t.note(path, value, "a transformers causal LM: model.source = \"hf\" (unless model_path "
                            "names an AzureML registry model)")
    elif kind in (m.lower() for m in MODEL_TYPES):
        raise t.error(path, f"not supported: slmflow fine-tunes a transformers model (PyTorchModel "
                            f"or HfModel), not a {value}"
                            + ("; for `olive generate-adapter`'s result, give the HfModel with its "
                               "adapter_path and a ModelBuilder and an ExtractAdapters pass"
                               if kind == "onnxmodel" else ""))
    else:
        raise t.unknown(path, value, list(MODEL_TYPES), "model type")


def handle_model_path(t: Translator, value: Any, path: str, node: dict) -> None:
    if isinstance(value, str) and value.startswith("azureml:"):
        match = REGISTRY_URI.match(value)
        if not match:
            raise t.error(path, f"{quoted(value)} is not an AzureML registry model; write "
                                "azureml://registries/R/models/N/versions/V")
        registry_model(t, *match.groups(), value, path)
    elif isinstance(value, str):
        t.note(path, value, t.put("model.name_or_path", value, path))
    elif isinstance(value, dict):
        model_resource(t, value, path)
    else:
        raise t.error(path, f"expected a hub id, a folder or a resource, got {show(value)}")


def model_resource(t: Translator, value: dict, path: str) -> None:
    """An Olive resource: `{type: azureml_registry_model | file | folder | string_name, ...}`."""
    inner = value.get("config")
    if inner is not None and not isinstance(inner, dict):
        raise t.error(f"{path}.config", f"expected a mapping, got {show(inner)}")
    conf = {k: v for k, v in {**value, **(inner or {})}.items() if k not in ("config", "type")}
    kind = value.get("type")
    if kind == "azureml_registry_model":
        for key in conf:
            if key not in (*REGISTRY_KEYS, "azureml_client"):
                raise t.unknown(f"{path}.config.{key}", key, REGISTRY_KEYS)
        registry_model(t, conf.get("registry_name"), conf.get("name"), conf.get("version"),
                       value, path)
    elif kind in ("file", "folder", "string_name") and isinstance(conf.get("path"), str):
        t.note(path, value, t.put("model.name_or_path", conf["path"], path))
    else:
        raise t.error(path, f"not supported: model_path of type {given(kind)}; use a hub id, a "
                            "local folder or an azureml_registry_model")


def registry_model(t: Translator, registry: Any, name: Any, version: Any, value: Any,
                   path: str) -> None:
    """An AzureML registry model: the base-model stage downloads it with your Azure login."""
    if is_number(version) and float(version).is_integer():
        version = str(int(version))
    for key, part in (("registry_name", registry), ("name", name), ("version", version)):
        if not (isinstance(part, str) and part.strip()):
            raise t.error(path, f"an azureml_registry_model needs {key} as text (e.g. registry_name "
                                f"azureml-msr, name microsoft/Phi-3-mini-4k-instruct, version "
                                f"\"11\"), got {show(part)}")
    became = "; ".join([t.put("model.source", "azureml_registry", path),
                        t.put("model.name_or_path", name, path),
                        t.put("model.registry_name", registry, path),
                        t.put("model.version", version, path)])
    t.note(path, value, f"{became} (downloaded from the registry by the base-model stage with "
                        "your Azure login)")


def handle_adapter_path(t: Translator, value: Any, path: str, node: dict) -> None:
    """An adapter trained before (Olive's HfModel `adapter_path`, a folder or a resource)."""
    if isinstance(value, dict):
        inner = value.get("config")
        conf = {**value, **(inner if isinstance(inner, dict) else {})}
        if value.get("type") not in ("folder", "string_name") or not isinstance(conf.get("path"), str):
            raise t.error(path, f"not supported: adapter_path of type {given(value.get('type'))}; "
                                "give a local folder (the PEFT adapter's save_pretrained folder)")
        value = conf["path"]
    if value is None:
        t.note(path, value, "noted: null: slmflow trains the adapter")
        return
    if not isinstance(value, str) or value.startswith(("azureml:", "hf:")):
        raise t.error(path, f"expected the local folder of a PEFT LoRA adapter, got {show(value)}; "
                            "download the adapter and give its folder")
    t.note(path, value, t.put("finetune.adapter_path", value, path) + " (an adapter trained "
           "before: merged or exported as it is, nothing trained)")


def handle_hf_model_name(t: Translator, value: Any, path: str, node: dict) -> None:
    if "model_path" in t.model_node:
        t.note(path, value, "noted: the model's hub name; the model itself comes from model_path")
    else:
        t.note(path, value, t.put("model.name_or_path", value, path))


def handle_task(t: Translator, value: Any, path: str, node: dict) -> None:
    if value not in (None, "text-generation", "text-generation-with-past"):
        raise t.error(path, f"not supported: task {given(value)}; slmflow fine-tunes causal LMs "
                            "(text-generation)")
    t.note(path, value, "noted: slmflow fine-tunes causal LMs (text-generation)")


def finish_model(t: Translator) -> None:
    """The base model must be named; a hub id or folder is model.source hf."""
    if "name_or_path" not in t.out.get("model", {}):
        raise t.error("input_model", "name the base model: model_path (Olive 0.13) or "
                                     "config.hf_config.model_name (a hub id or local folder)")
    t.out["model"].setdefault("source", "hf")


TASK = Special(handle_task, "text-generation only (slmflow fine-tunes causal LMs)")
DTYPE = Noted("slmflow trains the LoRA base in float32 (bf16 was 22x slower on CPUs without bf16); "
              "QLoRA computes in finetune.compute_dtype; merge.dtype for the merge")
SCRIPTS = Refused("slmflow loads transformers models only, no model scripts")

LOAD_KWARGS = Table({
    "trust_remote_code": Map("model.trust_remote_code"),
    "revision": Map("model.revision"),
    "torch_dtype": DTYPE,
    "dtype": DTYPE,
    "attn_implementation": Noted("transformers picks the attention implementation"),
    "device_map": Noted("slmflow places the model with finetune.device"),
    "low_cpu_mem_usage": Noted("transformers' default applies"),
    "quantization_method": Refused("slmflow quantizes the base itself for QLoRA (a QLoRA pass)"),
    "quantization_config": Refused("slmflow quantizes the base itself for QLoRA (a QLoRA pass)"),
})
HF_CONFIG = Table({
    "model_name": Special(handle_hf_model_name, "→ `model.name_or_path` (a hub id or local "
                          "folder), unless model_path names the model"),
    "task": TASK,
    "model_class": Noted("slmflow loads the model with AutoModelForCausalLM"),
    "model_loading_args": Section(LOAD_KWARGS),
    "from_pretrained_args": Section(LOAD_KWARGS),
    "components": Refused("slmflow exports with onnxruntime-genai's model builder, which needs no "
                          "components"),
})
INPUT_MODEL = Table({
    "type": Special(handle_model_type, "PyTorchModel or HfModel: a transformers causal LM "
                    "(`model.source` hf); ONNXModel and other types refused"),
    "model_path": Special(
        handle_model_path, "a hub id or local folder → `model.name_or_path`; an "
        "azureml_registry_model (or azureml://registries/R/models/N/versions/V) → `model.source` "
        "azureml_registry with `model.name_or_path`, `model.registry_name`, `model.version` "
        "(downloaded by the base-model stage with your Azure login)"),
    "hf_config": Section(HF_CONFIG),
    "task": TASK,
    "load_kwargs": Section(LOAD_KWARGS),
    "model_file_format": Noted("the registry model's file layout (e.g. PyTorch.MLflow): slmflow "
                               "uses the transformers folder (config.json, safetensors) inside it"),
    "adapter_path": Special(
        handle_adapter_path, "a trained PEFT LoRA adapter folder → `finetune.adapter_path`: "
        "nothing is trained, it is merged (or, with an ExtractAdapters pass, exported as an "
        ".onnx_adapter file: `olive generate-adapter`'s result), exported and evaluated; with a "
        "LoRA or QLoRA pass refused, as Olive refuses it"),
    "io_config": Noted("the model builder derives the inputs and outputs from the model"),
    "generative": Noted("slmflow's models are generative"),
    "model_attributes": Refused("slmflow reads the model's attributes from its config.json"),
    "model_loader": SCRIPTS,
    "model_script": SCRIPTS,
    "script_dir": SCRIPTS,
    "dummy_inputs_func": SCRIPTS,
}, wrapper="config")
