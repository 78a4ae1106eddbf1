"""LoRA adapters apart from an int4 ONNX base: onnxruntime-genai's multi-LoRA (as Olive ships it).

The base is built once per (base model, recipe, LoRA shape): the model builder gets a *shape
adapter* (`--extra_options adapter_path=`), a PEFT folder with the fine-tunes' target modules and
rank whose weights are all zero, so the graph holds the LoRA branches
(`/model/layers.N/attn/q_proj/lora_A/MatMul`, `.../lora_B/MatMul`, `.../lora/Add`; a fused
`qkv_proj` or `gate_up_proj` split as the builder splits the base weight) and computes the base
model exactly while no adapter is active. `nodes_to_exclude` keeps those MatMuls fp32 (the base
stays int4); then each LoRA initializer becomes a graph input of the same name, the zero
initializer kept as its default (Olive's ExtractAdapters does the same).

A fine-tune's adapter is one `.onnx_adapter` file (`onnxruntime.AdapterFormat`): each graph input
filled from the PEFT weights in the builder's layout (the weight transposed; lora_B scaled by
alpha/r, or alpha/sqrt(r) with rsLoRA; a fused module's lora_B split by rows, its lora_A shared).
Every input gets a tensor of exactly its shape, or the adapter is refused naming both sides.
At run time: `og.Adapters(model)`, `adapters.load(file, name)`,
`generator.set_active_adapter(adapters, name)`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from slmflow.errors import StageCheckError

ADAPTER_SUFFIX = ".onnx_adapter"
# The adapter file of an export_adapter entry (in its folder; here so generate needs no stage).
ADAPTER_FILE = "adapter" + ADAPTER_SUFFIX
ADAPTERS_FILE = "slmflow_adapters.json"  # in a separate-form folder: the base's LoRA shape, adapters
# The builder's projections for each PEFT target module it can carry a LoRA branch on.
BUILDER_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "q_proj": ("attn/q_proj",), "k_proj": ("attn/k_proj",), "v_proj": ("attn/v_proj",),
    "o_proj": ("attn/o_proj",), "qkv_proj": ("attn/q_proj", "attn/k_proj", "attn/v_proj"),
    "gate_proj": ("mlp/gate_proj",), "up_proj": ("mlp/up_proj",), "down_proj": ("mlp/down_proj",),
    "gate_up_proj": ("mlp/gate_proj", "mlp/up_proj"),
}
_PEFT_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_INPUT = re.compile(r"^model\.layers\.(\d+)\.(attn|mlp)\.(\w+)\.lora_([AB])\.MatMul\.weight$")


def unsupported_targets(target_modules: list[str]) -> list[str]:
    return [t for t in target_modules if t not in BUILDER_PROJECTIONS]


def lora_node_names(num_layers: int, target_modules: list[str]) -> list[str]:
    """The builder's LoRA MatMul node names for these targets (kept fp32 in an int4 base)."""
    names = []
    for layer in range(num_layers):
        for target in target_modules:
            for proj in BUILDER_PROJECTIONS[target]:
                names += [f"/model/layers.{layer}/{proj}/lora_{ab}/MatMul" for ab in "AB"]
    return names


def write_shape_adapter(model_folder: Path, target_modules: list[str], r: int, out: Path) -> None:
    """A PEFT LoRA folder of the given shape with all-zero weights, from the base's safetensors
    headers (no model is loaded): what the model builder needs to lay out the LoRA branches."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    for file in sorted(model_folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                shape = f.get_slice(key).get_shape()
                module = key[: -len(".weight")] if key.endswith(".weight") else ""
                if len(shape) != 2 or module.rsplit(".", 1)[-1] not in target_modules:
                    continue
                prefix = f"base_model.model.{module}"
                tensors[f"{prefix}.lora_A.weight"] = torch.zeros(r, shape[1])
                tensors[f"{prefix}.lora_B.weight"] = torch.zeros(shape[0], r)
    if not tensors:
        raise StageCheckError(f"export: the base model has none of finetune.target_modules "
                              f"{target_modules}; check finetune.target_modules")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r,
        "target_modules": sorted(target_modules), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "base_model_name_or_path": None, "inference_mode": True,
    }, indent=2))


def expose_lora_inputs(folder: Path, expected_nodes: list[str]) -> list[dict[str, Any]]:
    """Make the LoRA initializers of `folder/model.onnx` graph inputs (the zero initializer kept
    as default); check every LoRA MatMul is there and fp32. Returns [{name, shape, dtype}]."""
    import onnx

    path = folder / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    nodes = {n.name: n for n in model.graph.node if "/lora_" in n.name}
    missing = sorted(set(expected_nodes) - set(nodes))
    quantized = sorted(n.name for n in nodes.values() if n.op_type != "MatMul")
    if missing or quantized:
        raise StageCheckError(
            "export: the model builder's LoRA branches are not as expected ("
            + (f"missing {missing[:3]}" if missing else f"quantized {quantized[:3]}")
            + "); this onnxruntime-genai names or quantizes them otherwise: use export.adapters=merged")
    weights = {n.input[1] for n in nodes.values()}
    params = []
    existing = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if init.name not in weights or init.name in existing:
            continue
        shape = list(init.dims)
        model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, shape))
        params.append({"name": init.name, "shape": shape,
                       "dtype": onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name})
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))  # initializers stay in model.onnx.data, where they are
    tmp.replace(path)
    return sorted(params, key=lambda p: p["name"])


def read_peft(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config.json, tensors) of a PEFT LoRA folder."""
    from safetensors.numpy import load_file

    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise StageCheckError(f"adapter {adapter_dir}: no adapter_config.json; a PEFT LoRA folder "
                              "holds adapter_config.json and adapter_model.safetensors")
    config = json.loads(config_file.read_text())
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise StageCheckError(f"adapter {adapter_dir}: no adapter_model.safetensors (safetensors "
                              "only); save the adapter with safe_serialization=True")
    return config, load_file(str(weights))


def lora_shape(config: dict[str, Any]) -> dict[str, Any]:
    """What a base's LoRA branches must fit: target modules and rank."""
    targets = config.get("target_modules")
    targets = sorted([targets] if isinstance(targets, str) else targets or [])
    return {"target_modules": targets, "r": int(config.get("r", 0))}


def check_fits(adapter_name: str, adapter_shape: dict[str, Any], base_name: str,
               base_shape: dict[str, Any]) -> None:
    """Refuse an adapter whose target modules or rank differ from the base's, naming both."""
    if adapter_shape != base_shape:
        raise StageCheckError(
            f"adapter {adapter_name} (target_modules {adapter_shape['target_modules']}, r "
            f"{adapter_shape['r']}) does not fit base {base_name} (target_modules "
            f"{base_shape['target_modules']}, r {base_shape['r']}); fine-tune with the base's "
            "target modules and rank, or build a base for this shape (export.adapters=separate "
            "with this fine-tune's config)")


def adapter_tensors(config: dict[str, Any], peft: dict[str, Any],
                    params: list[dict[str, Any]]) -> dict[str, Any]:
    """Each of the base's LoRA inputs filled from PEFT weights, in the builder's layout."""
    import numpy as np

    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise StageCheckError("adapter: per-module rank_pattern/alpha_pattern is not supported by "
                              "export.adapters=separate (one rank for every module); use merged")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
    by_module: dict[tuple[int, str, str], Any] = {}
    for key, value in peft.items():
        m = _PEFT_KEY.search(key)
        if m:
            by_module[(int(m.group(1)), m.group(2), m.group(3))] = value
    used: set[tuple[int, str, str]] = set()
    out: dict[str, Any] = {}
    for p in params:
        m = _INPUT.match(p["name"])
        if not m:
            raise StageCheckError(f"adapter: the base's LoRA input {p['name']} is not in the "
                                  "builder's naming; rebuild the base")
        layer, part, proj, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        source, rows = _source(by_module, params, layer, part, proj, ab)
        weight = by_module.get((layer, source, ab))
        if weight is None:
            raise StageCheckError(f"adapter has no LoRA weight for layers.{layer}.{proj} "
                                  f"(lora_{ab}) that the base's input {p['name']} needs; the "
                                  "adapter's target modules do not fit the base")
        used.add((layer, source, ab))
        weight = np.asarray(weight, dtype=np.float32)
        if rows is not None:
            weight = weight[rows[0]:rows[1]]
        if ab == "B":
            weight = weight * np.float32(scaling)
        tensor = np.ascontiguousarray(weight.T).astype(p["dtype"])
        if list(tensor.shape) != p["shape"]:
            raise StageCheckError(f"adapter tensor for {p['name']} has shape {list(tensor.shape)}, "
                                  f"the base's input {p['shape']}; the adapter's rank or module "
                                  "sizes do not fit the base")
        out[p["name"]] = tensor
    unused = sorted(f"layers.{k[0]}.{k[1]}.lora_{k[2]}" for k in set(by_module) - used)
    if unused:
        raise StageCheckError(f"adapter has LoRA weights the base has no branch for: "
                              f"{', '.join(unused[:4])}; the adapter's target modules do not fit "
                              "the base")
    return out


def _source(by_module: dict[tuple[int, str, str], Any], params: list[dict[str, Any]], layer: int,
            part: str, proj: str, ab: str) -> tuple[str, tuple[int, int] | None]:
    """The PEFT module a base input reads (its own, or the fused one it was split from) and, for
    a fused lora_B, its rows."""
    fused = {"attn": "qkv_proj", "mlp": "gate_up_proj"}[part]
    order = [t.split("/")[1] for t in BUILDER_PROJECTIONS[fused]]
    if (layer, proj, ab) in by_module or (layer, fused, ab) not in by_module or proj not in order:
        return proj, None
    if ab == "A":  # the fused module's lora_A is shared by its parts
        return fused, None
    sizes = [_input_shape(params, layer, part, o, "B")[1] for o in order]
    start = sum(sizes[: order.index(proj)])
    return fused, (start, start + sizes[order.index(proj)])


def _input_shape(params: list[dict[str, Any]], layer: int, part: str, proj: str, ab: str) -> list[int]:
    name = f"model.layers.{layer}.{part}.{proj}.lora_{ab}.MatMul.weight"
    for p in params:
        if p["name"] == name:
            return p["shape"]
    raise StageCheckError(f"adapter: the base has no LoRA input {name}; rebuild the base")


def base_version(base_key: str) -> int:
    """The base's version number in adapter files (AdapterFormat's model version): from its key."""
    return int(base_key[:7], 16)


def export_adapter(tensors: dict[str, Any], path: Path, model_version: int) -> None:
    """Write an .onnx_adapter file and read it back: the file must hold exactly these tensors.

    `OrtValue.ortvalue_from_numpy` does not copy: the arrays stay referenced here until
    `export_adapter` has written them (freed earlier, the file held garbage)."""
    import numpy as np
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(model_version)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    tmp = path.with_name(path.name + ".tmp")
    fmt.export_adapter(str(tmp))
    back = ort.AdapterFormat.read_adapter(str(tmp))
    got = back.get_parameters()
    bad = [k for k in arrays if k not in got or not np.array_equal(got[k].numpy(), arrays[k])]
    if bad or len(got) != len(arrays) or back.get_model_version() != model_version:
        tmp.unlink(missing_ok=True)
        raise StageCheckError(f"adapter file {path.name} does not read back as written "
                              f"({(bad or ['version'])[0]})")
    tmp.replace(path)


def check_adapter_file(path: Path, base_ver: int, base_name: str) -> None:
    """One line when an adapter file was made for another base build (its model version)."""
    import onnxruntime as ort

    try:
        version = ort.AdapterFormat.read_adapter(str(path)).get_model_version()
    except Exception as exc:  # noqa: BLE001 - an unreadable file is the finding
        raise StageCheckError(f"adapter {path}: not an onnxruntime adapter file ({exc})") from None
    if version != base_ver:
        raise StageCheckError(
            f"adapter {path.name} was exported for base version {version}, {base_name} is version "
            f"{base_ver}; export the adapter again against this base (slmflow run with "
            "export.adapters=separate)")
