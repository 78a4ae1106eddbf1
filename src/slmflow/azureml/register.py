"""Register an exported model folder (OUTPUT_DIR/model) in an AzureML workspace.

Run as:
    python -m slmflow.azureml.register runs/default/model --name tone-int4 \
        --subscription SUB --resource-group RG --workspace WS

Its manifest.json (content hashes, config, versions) goes along as the model's files; the tags
carry the export's content hash and precision, so a registered version says what it is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from slmflow.errors import ConfigError


def register_exported_model(model_dir: Path, name: str, client: Any) -> str:
    """Register `model_dir` under `name`; returns NAME:VERSION."""
    manifest_path = Path(model_dir) / "manifest.json"
    if not (Path(model_dir) / "genai_config.json").is_file() or not manifest_path.is_file():
        raise ConfigError(f"{model_dir}: not an exported slmflow model (no genai_config.json and "
                          "manifest.json); give OUTPUT_DIR/model of a finished run")
    manifest = json.loads(manifest_path.read_text())
    export = manifest.get("stages", {}).get("export", {})
    tags = {"slmflow.sha256": str(export.get("sha256", "")),
            "slmflow.precision": str(manifest.get("config", {}).get("export", {}).get("precision", ""))}
    return client.register_model(Path(model_dir), name, "slmflow int4 ONNX model "
                                 "(onnxruntime-genai)", tags)


def main(argv: list[str] | None = None) -> int:
    from slmflow.azureml.client import AzureMLClient, Workspace

    p = argparse.ArgumentParser(prog="python -m slmflow.azureml.register", description=__doc__)
    p.add_argument("model_dir", type=Path, help="OUTPUT_DIR/model of a finished run")
    p.add_argument("--name", required=True, help="model name in the workspace")
    p.add_argument("--subscription", required=True, help="Azure subscription id")
    p.add_argument("--resource-group", required=True, help="resource group of the workspace")
    p.add_argument("--workspace", required=True, help="AzureML workspace name")
    args = p.parse_args(argv)
    client = AzureMLClient(Workspace(args.subscription, args.resource_group, args.workspace))
    print(register_exported_model(args.model_dir, args.name, client))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
