"""Stage 5, separate form (`export.adapters: separate`): an int4 base and one adapter file per
fine-tune, for onnxruntime-genai's multi-LoRA (`slmflow.onnx_adapters` has the format).

- `export_base` (kind `onnx_base`): the model builder on the *base* model with a zero shape
  adapter; keyed on the base model, the export recipe and the LoRA shape (target modules, rank),
  never on a fine-tune: every fine-tune of that base with that shape shares it.
- `export_adapter` (kind `onnx_adapter`): the fine-tune's PEFT weights written as
  `adapter.onnx_adapter` for that base; refused, naming both, when it does not fit the base;
  then the base loads it through `og.Adapters` and generates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmflow import onnx_adapters as oa
from slmflow.artifacts import ArtifactRef, dir_size
from slmflow.config import ExportConfig
from slmflow.errors import StageCheckError
from slmflow.stage import REQUIRED, Stage, Workspace
from slmflow.stages import export

ADAPTER_FILE = oa.ADAPTER_FILE
SMOKE_PROMPT = "Hello"  # the base build has no data of its own: any text proves it generates


def lora_of(adapter: ArtifactRef) -> dict[str, Any]:
    """The LoRA shape (target modules, rank) of a fine-tune's adapter folder."""
    config = json.loads((adapter.path / "adapter_config.json").read_text())
    return oa.lora_shape(config)


def base_key_config(cfg: ExportConfig, lora: dict[str, Any]) -> dict[str, Any]:
    return {"export": export.key_config(cfg), "lora": lora}


def build_base(cfg: ExportConfig, ws: Workspace, base: ArtifactRef, lora: dict[str, Any]) -> dict[str, Any]:
    """The base model through the builder with a zero adapter of shape `lora`; LoRA weights made
    graph inputs."""
    from slmflow.folders import describe_model, model_dir
    from slmflow.resources import check_resources, estimate_export

    bad = oa.unsupported_targets(lora["target_modules"])
    if bad:
        raise StageCheckError(
            f"export.adapters=separate: the model builder carries LoRA branches on "
            f"{sorted(oa.BUILDER_PROJECTIONS)}, not on {bad} (finetune.target_modules); "
            "use export.adapters=merged or fine-tune those modules only")
    folder = model_dir(base)
    params = describe_model(folder)["parameters"]
    check_resources("export", *estimate_export(params, cfg.precision), ws.out)
    layers = int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])
    nodes = oa.lora_node_names(layers, lora["target_modules"])
    shape_dir = ws.work / "shape-adapter"
    oa.write_shape_adapter(folder, lora["target_modules"], lora["r"], shape_dir)
    extra = {**cfg.extra_options, "adapter_path": str(shape_dir)}
    if cfg.precision in ("int4", "int8"):  # the base quantized, its LoRA branches kept fp32
        asked = str(cfg.extra_options.get("nodes_to_exclude") or "")  # the user's, kept
        extra["nodes_to_exclude"] = ",".join([n for n in asked.split(",") if n] + nodes)
    cmd = export.builder_command(cfg.model_copy(update={"extra_options": extra}), folder, ws.out,
                                 ws.work / "builder-cache")
    ws.log("export_base: " + " ".join(cmd[2:]).replace(",".join(nodes), f"<{len(nodes)} LoRA MatMuls>"))
    export._run_checked(cmd, ws.work, "the model builder", "check export.block_size (hidden "
                        "sizes must divide by it) and export.algo_config")
    if not (ws.out / "genai_config.json").is_file():
        raise StageCheckError("export_base: the model builder wrote no genai_config.json; check "
                              "export.precision and export.execution_provider")
    inputs = oa.expose_lora_inputs(ws.out, nodes)
    try:
        sample = export.smoke_generate(ws.out, SMOKE_PROMPT)
    except Exception as exc:  # noqa: BLE001 - any failure to load or run is the finding
        raise StageCheckError(f"export_base: onnxruntime-genai cannot run the base with LoRA "
                              f"inputs ({exc}); use export.adapters=merged") from None
    ws.log(f"export_base: {len(inputs)} LoRA inputs (fp32), loads and generates: {sample!r}")
    return {
        "precision": cfg.precision,
        "execution_provider": cfg.execution_provider,
        "builder_options": export.builder_options(cfg),
        "lora": lora,
        "lora_inputs": inputs,
        "size_bytes": dir_size(ws.out),
        "smoke_output": sample,
    }


def adapter_key_config(cfg: ExportConfig) -> dict[str, Any]:
    # The file depends on the base and the fine-tune (its inputs), not on the export config.
    return {"format": 1}


def build_adapter(cfg: ExportConfig, ws: Workspace, onnx_base: ArtifactRef, adapter: ArtifactRef,
                  data: ArtifactRef) -> dict[str, Any]:
    """The fine-tune's adapter as one .onnx_adapter file for `onnx_base`, checked by loading."""
    from slmflow.folders import read_split

    config, peft = oa.read_peft(adapter.path)
    oa.check_fits(f"of this fine-tune ({adapter.key})", oa.lora_shape(config),
                  f"build {onnx_base.key}", onnx_base.meta["lora"])
    tensors = oa.adapter_tensors(config, peft, onnx_base.meta["lora_inputs"])
    version = oa.base_version(onnx_base.sha256)
    oa.export_adapter(tensors, ws.out / ADAPTER_FILE, version)
    del tensors, peft  # written and read back: the arrays may go now
    prompt = read_split(data, "eval")[0]["prompt"]
    try:
        sample = smoke_with_adapter(onnx_base.path, ws.out / ADAPTER_FILE, prompt)
    except Exception as exc:  # noqa: BLE001 - any failure to load or run is the finding
        raise StageCheckError(f"export_adapter: onnxruntime-genai cannot run the base with this "
                              f"adapter ({' '.join(str(exc).split())})") from None
    ws.log(f"export_adapter: {len(onnx_base.meta['lora_inputs'])} tensors, base version "
           f"{version}; loads and generates: {sample!r}")
    return {"base_version": version, "base_sha256": onnx_base.sha256,
            "adapter_sha256": adapter.sha256, "lora": onnx_base.meta["lora"],
            "size_bytes": dir_size(ws.out), "smoke_output": sample}


def smoke_with_adapter(base: Path, adapter_file: Path, prompt: str, max_new_tokens: int = 4) -> str:
    import onnxruntime_genai as og

    from slmflow.generate import onnx_backend

    backend = onnx_backend(base, adapter_file)
    tokenizer = og.Tokenizer(backend.engine)
    return tokenizer.decode(backend.generate([list(tokenizer.encode(prompt))], max_new_tokens)[0])


BASE_STAGE = Stage(name="export_base", kind="onnx_base", version=1, inputs=("base",),
                   options={"lora": REQUIRED}, key_config=base_key_config, build=build_base)
ADAPTER_STAGE = Stage(name="export_adapter", kind="onnx_adapter", version=1,
                      inputs=("onnx_base", "adapter", "data"), key_config=adapter_key_config,
                      build=build_adapter)
