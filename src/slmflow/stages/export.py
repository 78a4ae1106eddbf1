"""Stage 5: export the merged model to ONNX with onnxruntime-genai's model builder.

Runs `python -m onnxruntime_genai.models.builder -i MERGED -o OUT -p PRECISION -e EP -c CACHE
--extra_options ...` in a subprocess (the builder holds the whole model in memory; a subprocess
gives it back), through `slmflow.stages.builder_main`, which only makes onnxruntime's k-quant
work a slice at a time (same bytes, ~0.6 GB less peak on SmolLM2); then checks that
onnxruntime-genai loads the result and generates.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def builder_command(cfg: ExportConfig, model: Path, out: Path, cache: Path) -> list[str]:
    opts = builder_options(cfg)
    return [
        sys.executable, "-m", "slmflow.stages.builder_main",  # the builder's CLI, leaner k-quant
        "-i", str(model), "-o", str(out), "-p", cfg.precision,
        "-e", cfg.execution_provider, "-c", str(cache),
        "--extra_options", *[f"{k}={v}" for k, v in opts.items()],
    ]  # fmt: skip


def smoke_generate(folder: Path, prompt: str, max_new_tokens: int = 4) -> str:
    """Load the exported model with onnxruntime-genai (its own tokenizer too) and generate."""
    import onnxruntime_genai as og

    from slmflow.generate import onnx_backend

    backend = onnx_backend(folder)
    tokenizer = og.Tokenizer(backend.engine)
    return tokenizer.decode(backend.generate([list(tokenizer.encode(prompt))], max_new_tokens)[0])


def key_config(cfg: ExportConfig) -> dict[str, Any]:
    # What is built, not how it was chosen: a recipe search's candidate and the same recipe
    # asked for by hand share one folder.
    return cfg.model_dump(mode="json", exclude={"recipe", "search"})


def build(cfg: ExportConfig, ws: Workspace, merged: ArtifactRef, data: ArtifactRef) -> dict[str, Any]:
    """Build the ONNX model into the stage folder and prove it loads and generates."""
    from slmflow.folders import describe_model, model_dir, read_split
    from slmflow.resources import check_resources, estimate_export

    folder = model_dir(merged)
    params = describe_model(folder)["parameters"]
    check_resources("export", *estimate_export(params, cfg.precision), ws.out)  # before the builder

    cmd = builder_command(cfg, folder, ws.out, ws.work / "builder-cache")
    ws.log("export: " + " ".join(cmd[2:]))
    # The builder stamps the model with `git rev-parse HEAD` run next to its install, which finds
    # whatever checkout holds the virtualenv: without a repository it stamps its own commit, so
    # the same export has the same bytes whoever runs it.
    env = {**os.environ, "GIT_DIR": os.devnull}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ws.work, env=env, check=False)
    if proc.returncode != 0 or not (ws.out / "genai_config.json").is_file():
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        cause = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "")
        raise StageCheckError(
            f"export: the model builder failed (exit {proc.returncode}): {cause}; check "
            "export.block_size (hidden sizes must divide by it) and export.algo_config"
        )
    prompt = read_split(data, "eval")[0]["prompt"]
    try:
        sample = smoke_generate(ws.out, prompt)
    except Exception as exc:  # noqa: BLE001 - any failure to load or run is the finding
        raise StageCheckError(
            f"export: onnxruntime-genai cannot run the exported model ({exc}); try another "
            "export.algo_config or export.matmul_mixed_precision"
        ) from None
    ws.log(f"export: loads and generates: {sample!r}")
    return {
        "precision": cfg.precision,
        "execution_provider": cfg.execution_provider,
        "builder_options": builder_options(cfg),
        "size_bytes": dir_size(ws.out),
        "smoke_output": sample,
    }


STAGE = Stage(name="export", kind="onnx_model", version=1, inputs=("merged", "data"),
              key_config=key_config, build=build)
