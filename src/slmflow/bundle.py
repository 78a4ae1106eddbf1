"""Publishing the separate form: one int4 base and its fine-tunes' adapter files in one folder.

`OUTPUT_DIR/model/` of an `export.adapters: separate` run, and the folder `slmflow bundle`
writes from several such runs, hold the base's files (hard links to its cache entry), one
`<task>.onnx_adapter` per fine-tune, `manifest.json` and `slmflow_model.json`, whose `adapters`
block says for each adapter its file, the base version it was exported for, what it was trained
on and its own card (prompt template, labels, guidance): tasks with different label sets share
the base. The card's top-level fields are the default adapter's, so a one-adapter folder reads
as a plain model card.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from slmflow import onnx_adapters as oa
from slmflow.artifacts import MANIFEST, ArtifactRef, hash_file, replace_dir
from slmflow.errors import SlmflowError, StageCheckError


class BundleError(SlmflowError):
    """Adapters that cannot share one folder (exit 2, one line)."""


def task_name(config: Any) -> str:
    """An adapter's name in a folder: its training file's stem (tones, tickets, ...)."""
    cfg = config if isinstance(config, dict) else config.model_dump(mode="json")
    return Path(str(cfg["data"]["train_file"]).split(":", 1)[-1]).name.split(".", 1)[0] or "adapter"


def run_entry(config: Any, onnx_adapter: ArtifactRef, data: ArtifactRef,
              inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a folder records of one fine-tune's adapter: its file, base version, card and data
    (`inputs`, the manifest's: a given adapter's sha256 for the card)."""
    from slmflow.modelcard import build_card

    cfg = config if isinstance(config, dict) else config.model_dump(mode="json")
    card = build_card(cfg, inputs)
    card.pop("adapters", None)
    return {
        "name": task_name(cfg),
        "source": onnx_adapter.path / "adapter.onnx_adapter",
        "base_version": onnx_adapter.meta["base_version"],
        "lora": onnx_adapter.meta["lora"],
        "trained_on": {"train_file": cfg["data"]["train_file"], "dataset_sha256": data.sha256,
                       "finetune_adapter_sha256": onnx_adapter.meta["adapter_sha256"],
                       "labels": list(cfg["data"]["labels"])},
        "card": card,
    }


def publish_separate(base: ArtifactRef, entries: list[dict[str, Any]], out_dir: Path,
                     manifest: dict[str, Any]) -> Path:
    """A run's OUTPUT_DIR/model: the base's files, each entry's adapter file and the cards."""
    version = oa.base_version(base.sha256)
    for e in entries:  # every adapter must have been exported for this very base build
        oa.check_fits(e["name"], e["lora"], f"build {base.key}", base.meta["lora"])
        if e["base_version"] != version:
            raise BundleError(f"adapter {e['name']} was exported for base version "
                              f"{e['base_version']}, this base is version {version}; export it "
                              "again with the same model and export recipe")
    return _publish(base.path, entries, Path(out_dir), manifest, version, base.meta["lora"],
                    skip={MANIFEST})


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def bundle_folders(sources: list[Path], output: Path) -> Path:
    """One folder (`output/model`) with the shared base and every adapter of `sources`: output
    folders of `export.adapters: separate` runs (or their `model/` folders, or bundles). Refused,
    one line, when an adapter was exported for another base build or another LoRA shape."""
    from slmflow.modelcard import CARD, ModelFolderError, adapter_files, read_card

    if not sources:
        raise BundleError("slmflow bundle: give the output folders of two or more "
                          "export.adapters=separate runs")
    folders = [s / "model" if (s / "model" / CARD).is_file() else s for s in map(Path, sources)]
    cards = []
    for folder in folders:
        card = read_card(folder)
        if not card.get("adapters"):
            raise ModelFolderError(f"{folder} holds a merged model, no adapter file; run it with "
                                   "export.adapters=separate")
        adapter_files(folder, card)  # present and exported for that folder's base
        cards.append(card)
    first, base = cards[0]["adapters"], folders[0]
    entries, manifests = [], {}
    for folder, card in zip(folders, cards, strict=True):
        block = card["adapters"]
        for name, entry in block["files"].items():
            try:
                oa.check_fits(f"{name} ({folder})", block["lora"], f"{base}", first["lora"])
            except StageCheckError as exc:  # bad input to the command: exit 2
                raise BundleError(str(exc)) from None
            if entry["base_version"] != first["base_version"]:
                raise BundleError(
                    f"adapter {name} ({folder}) was exported for base version "
                    f"{entry['base_version']}, {base} is version {first['base_version']}: not "
                    "the same base build (base model or export recipe differ); run it with the "
                    "first run's model and export settings")
            entries.append({"name": name, "source": folder / entry["file"], **{
                k: entry[k] for k in ("base_version", "trained_on", "card")}, "lora": block["lora"]})
        manifests[str(folder)] = json.loads((folder / "manifest.json").read_text())
    return _publish(base, entries, Path(output), {"bundle_of": manifests},
                    first["base_version"], first["lora"], skip={"manifest.json", CARD})


def _publish(base: Path, entries: list[dict[str, Any]], out_dir: Path, manifest: dict[str, Any],
             version: int, lora: dict[str, Any], skip: set[str], folder_name: str = "model") -> Path:
    """Base files (hard links), adapter files, manifest and card, swapped in at out_dir/model."""
    from slmflow.modelcard import CARD

    names = [e["name"] for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BundleError(f"two adapters are named {twice[0]} (their training files' stem); "
                          "rename one training file")
    final = out_dir / folder_name
    tmp = out_dir / f".{folder_name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for src in base.iterdir():
            if src.is_file() and src.name not in skip and not src.name.endswith(oa.ADAPTER_SUFFIX):
                _link(src, tmp / src.name)
        block: dict[str, Any] = {"base_version": version, "lora": lora,
                                 "default": entries[0]["name"], "files": {}}
        for e in entries:
            file = f"{e['name']}{oa.ADAPTER_SUFFIX}"
            _link(Path(e["source"]), tmp / file)
            block["files"][e["name"]] = {"file": file, "sha256": hash_file(tmp / file),
                                         "base_version": e["base_version"],
                                         "trained_on": e["trained_on"], "card": e["card"]}
        (tmp / "manifest.json").write_text(json.dumps({**manifest, "adapters": block}, indent=2))
        card = {**entries[0]["card"], "adapters": block}
        (tmp / CARD).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)
