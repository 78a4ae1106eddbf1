"""Stage 3, given form (`finetune.adapter_path`): an adapter trained elsewhere stands in for the
fine-tune; nothing is trained.

Its output is the fine-tune's artifact (kind `adapter`: `adapter_config.json`,
`adapter_model.safetensors`, an empty `train_log.json`), so merge, both export forms and the
evaluations take it as they take a trained one. Keyed by the adapter folder's content and the
base it was checked against: the same adapter is cached, a changed one is a new key. The checks
(`slmflow.peft_adapter`) run again here on the base the run really uses (a GGUF base is only
converted by the base-model stage), before the key and before any weights load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from slmflow import peft_adapter as pa
from slmflow.artifacts import ArtifactRef, hash_path
from slmflow.config import FinetuneConfig
from slmflow.errors import StageCheckError
from slmflow.stage import Stage, Workspace


def check(cfg: FinetuneConfig, base: ArtifactRef, source: ArtifactRef, **_: Any) -> None:
    from slmflow.folders import model_dir

    folder = Path(source.uri)
    config = pa.read_adapter_config(folder)
    pa.check_targets(config, base.meta.get("linear_modules"), base.meta.get("architecture"))
    pa.check_shapes(folder, model_dir(base), config)


def build(cfg: FinetuneConfig, ws: Workspace, base: ArtifactRef, source: ArtifactRef) -> dict[str, Any]:
    """Copy the adapter's config and weights; its key hashed the folder as the run started."""
    folder = Path(source.uri)
    if hash_path(folder) != source.sha256:  # edited while the run was starting
        raise StageCheckError(f"{pa.FIELD}: {folder} changed since the run checked it; run again")
    for name in pa.FILES:
        shutil.copy2(folder / name, ws.out / name)
    (ws.out / "train_log.json").write_text("[]")  # no loss curve: nothing was trained
    config = json.loads((folder / pa.CONFIG).read_text(encoding="utf-8"))
    ws.log(f"finetune: adapter given ({folder}, sha256 {source.sha256[:12]}): nothing trained")
    # the path is left out (a key of content): the report takes it from the run's config
    return {"given": {"sha256": source.sha256, **pa.describe(config)}}


def key_config(cfg: FinetuneConfig) -> dict[str, Any]:
    """Only the adapter's content (a parent) and the base make the key: the training settings
    do not change a given adapter, and the adapter's path (a folder moved) does not either."""
    return {"adapter": "given"}


STAGE = Stage(
    name="given_adapter",
    kind="adapter",
    version=1,
    inputs=("base", "source"),
    check=check,
    key_config=key_config,
    build=build,
)
