"""Stage 5: export the merged model to ONNX with onnxruntime-genai's model builder.

Runs `python -m onnxruntime_genai.models.builder -i MERGED -o OUT -p PRECISION -e EP -c CACHE
--extra_options ...` in a subprocess (the builder holds the whole model in memory; a subprocess
gives it back), through `slmflow.stages.builder_main`, which only makes onnxruntime's k-quant
work in slices of blocks on every core (same bytes, ~0.6 GB less peak on SmolLM2; threads:
`export.quantize_workers`); then checks that
onnxruntime-genai loads the result and generates.

Two more ways to int4 (`export.quantizer`): the builder writes the fp32 graph and
`slmflow.stages.quantize_main` quantizes it with onnxruntime's HQQ or GPTQ; and
`export.sensitivity.int8_budget` first ranks the MatMuls (`slmflow.sensitivity`) and has the
builder keep the most sensitive at int8 (its exact per-node weight overrides).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from slmflow import lifeline
from slmflow.artifacts import ArtifactRef, dir_size
from slmflow.config import ExportConfig
from slmflow.errors import StageCheckError
from slmflow.stage import Stage, Workspace


def builder_options(cfg: ExportConfig) -> dict[str, str]:
    """The builder's --extra_options for this config (quantization recipe and passthrough)."""
    opts: dict[str, str] = {"hf_token": "false"}  # never reach for a stored hub token
    if cfg.precision in ("int4", "int8"):
        opts["algo_config"] = cfg.algo_config
        if cfg.block_size is not None:
            opts["block_size"] = str(cfg.block_size)
        if cfg.accuracy_level is not None:
            opts["accuracy_level"] = str(cfg.accuracy_level)
        if cfg.matmul_mixed_precision:
            opts["matmul_mixed_precision"] = cfg.matmul_mixed_precision
    opts.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in cfg.extra_options.items()})
    return opts


def builder_command(cfg: ExportConfig, model: Path, out: Path, cache: Path,
                    int8_nodes: list[str] | None = None, tied: bool = False) -> list[str]:
    if cfg.quantizer != "builder":  # the fp32 graph, quantized afterwards by onnxruntime
        return [sys.executable, "-m", "slmflow.stages.builder_main", "-i", str(model),
                "-o", str(out), "-p", "fp32", "-e", cfg.execution_provider, "-c", str(cache),
                "--extra_options", "hf_token=false"]
    opts = builder_options(cfg)
    overrides = []
    if int8_nodes:  # the builder's exact per-node weight types
        weights: dict[str, Any] = {
            "overrides": [{"match": {"name": n}, "type": "int8"} for n in int8_nodes]}
        if tied:  # else the structured form leaves a tied embedding fp32 (the plain form doesn't)
            weights["op_types"] = ["MatMul", "Gather"]
        overrides = ["--target_options", json.dumps({"quant_config": {"weights": weights}})]
    return [
        sys.executable, "-m", "slmflow.stages.builder_main",  # the builder's CLI, leaner k-quant
        "-i", str(model), "-o", str(out), "-p", cfg.precision,
        "-e", cfg.execution_provider, "-c", str(cache),
        "--extra_options", *[f"{k}={v}" for k, v in opts.items()], *overrides,
    ]  # fmt: skip


def quantize_env(cfg: ExportConfig) -> dict[str, str]:
    """The builder's k-quant thread count, when the config sets it (else builder_main decides)."""
    from slmflow.stages.builder_main import WORKERS_ENV

    return {WORKERS_ENV: str(cfg.quantize_workers)} if cfg.quantize_workers else {}


def _run_checked(cmd: list[str], cwd: Path, what: str, fix: str,
                 env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # The builder stamps the model with `git rev-parse HEAD` run next to its install, which finds
    # whatever checkout holds the virtualenv: without a repository it stamps its own commit, so
    # the same export has the same bytes whoever runs it.
    # Under slmflow.lifeline: it ends with the run, even a killed one, and with Ctrl-C.
    env = {**os.environ, "GIT_DIR": os.devnull, **(env_extra or {})}
    proc = lifeline.run(cmd, cwd=cwd, env=env)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        cause = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "")
        raise StageCheckError(f"export: {what} failed (exit {proc.returncode}): {cause}; {fix}")
    return proc


def tied_embeddings(folder: Path) -> bool:
    """Whether the model's LM head is its embedding table (its config class decides a default;
    read from config.json: no code of the model's runs)."""
    from transformers import AutoConfig

    data = json.loads((folder / "config.json").read_text())
    if "tie_word_embeddings" in data:
        return bool(data["tie_word_embeddings"])
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    return bool(getattr(config, "tie_word_embeddings", False))


def sensitive_nodes(cfg: ExportConfig, ws: Workspace, folder: Path, data: ArtifactRef,
                    tied: bool) -> tuple[list[str], list[dict[str, Any]]]:
    """The MatMuls kept at int8 and the whole ranking (`slmflow.sensitivity`). With tied
    embeddings the LM head stays int4: the builder's int4 embedding reads its weights (an int8
    LM head there made a graph onnxruntime refuses)."""
    from slmflow.folders import read_split
    from slmflow.generate import torch_backend
    from slmflow.sensitivity import calibration_rows, rank, within_budget
    from slmflow.stage import release_memory

    train = read_split(data, "train")
    labels = sorted(data.meta["train"]["labels"])
    backend = torch_backend(folder)
    prompts = [backend.tokenizer(r["prompt"])["input_ids"]
               for r in calibration_rows(train, cfg.sensitivity.rows)]
    ranking = rank(backend, prompts, labels, cfg.block_size or 32)
    del backend
    release_memory()
    total = sum(r["parameters"] for r in ranking)
    eligible = [r for r in ranking if not (tied and r["node"] == "/lm_head/MatMul")]
    kept = within_budget(eligible, cfg.sensitivity.int8_budget, total)
    ws.log(f"export: int8 for the {len(kept)} MatMuls int4 hurts most (label KL "
           f"{ranking[0]['label_kl']:.3g} .. {ranking[-1]['label_kl']:.3g}): {', '.join(kept[:6])}"
           + (" ..." if len(kept) > 6 else ""))
    return kept, ranking


def smoke_generate(folder: Path, prompt: str, max_new_tokens: int = 4) -> str:
    """Load the exported model with onnxruntime-genai (its own tokenizer too) and generate."""
    import onnxruntime_genai as og

    from slmflow.generate import onnx_backend

    backend = onnx_backend(folder)
    tokenizer = og.Tokenizer(backend.engine)
    return tokenizer.decode(backend.generate([list(tokenizer.encode(prompt))], max_new_tokens)[0])


def key_config(cfg: ExportConfig) -> dict[str, Any]:
    # What is built, not how it was chosen: a recipe search's candidate and the same recipe
    # asked for by hand share one folder. The quantizer and sensitivity fields count only when
    # used, so the exports made before they existed keep their keys.
    # How many threads quantize changes no byte (builder_main), so it is no part of the key.
    dumped = cfg.model_dump(mode="json", exclude={"recipe", "search", "quantize_workers", "adapters"})
    if cfg.quantizer == "builder":
        dumped.pop("quantizer")
    if cfg.quantizer != "gptq":
        dumped.pop("calibration_rows")
    if not cfg.sensitivity.int8_budget:
        dumped.pop("sensitivity")
    return dumped


def build(cfg: ExportConfig, ws: Workspace, merged: ArtifactRef, data: ArtifactRef) -> dict[str, Any]:
    """Build the ONNX model into the stage folder and prove it loads and generates."""
    from slmflow.folders import describe_model, model_dir, read_split
    from slmflow.resources import check_resources, estimate_export

    folder = model_dir(merged)
    params = describe_model(folder)["parameters"]
    check_resources("export", *estimate_export(params, cfg.precision), ws.out)  # before the builder

    tied = tied_embeddings(folder)
    int8_nodes, ranking = [], None
    if cfg.sensitivity.int8_budget:
        int8_nodes, ranking = sensitive_nodes(cfg, ws, folder, data, tied)
    graph = ws.out if cfg.quantizer == "builder" else ws.work / "fp32"
    cmd = builder_command(cfg, folder, graph, ws.work / "builder-cache", int8_nodes, tied)
    ws.log("export: " + " ".join(cmd[2:]))
    proc = _run_checked(cmd, ws.work, "the model builder", "check export.block_size (hidden sizes "
                        "must divide by it) and export.algo_config", quantize_env(cfg))
    for line in (proc.stderr or "").splitlines():
        if line.startswith("slmflow k-quant:"):  # builder_main's time in the k-quant, threads
            ws.log("export: " + line[len("slmflow "):])
    if cfg.quantizer != "builder":
        from slmflow.stages.quantize_main import quantize_command

        cmd = quantize_command(cfg, graph, ws.out, data)
        ws.log("export: " + " ".join(cmd[2:]))
        _run_checked(cmd, ws.work, f"onnxruntime's {cfg.quantizer.upper()} quantizer",
                     "try export.quantizer=builder or another export.block_size")
        shutil.rmtree(graph)
    if not (ws.out / "genai_config.json").is_file():
        raise StageCheckError("export: the model builder wrote no genai_config.json; check "
                              "export.precision and export.execution_provider")
    prompt = read_split(data, "eval")[0]["prompt"]
    try:
        sample = smoke_generate(ws.out, prompt)
    except Exception as exc:  # noqa: BLE001 - any failure to load or run is the finding
        raise StageCheckError(
            f"export: onnxruntime-genai cannot run the exported model ({exc}); try another "
            "export.algo_config or export.matmul_mixed_precision"
        ) from None
    ws.log(f"export: loads and generates: {sample!r}")
    meta = {
        "precision": cfg.precision,
        "execution_provider": cfg.execution_provider,
        "builder_options": builder_options(cfg),
        "size_bytes": dir_size(ws.out),
        "smoke_output": sample,
    }
    if cfg.quantizer != "builder":
        meta["quantizer"] = cfg.quantizer
    if ranking is not None:
        meta.update(int8_nodes=int8_nodes, sensitivity=ranking)
    return meta


STAGE = Stage(name="export", kind="onnx_model", version=1, inputs=("merged", "data"),
              key_config=key_config, build=build)
