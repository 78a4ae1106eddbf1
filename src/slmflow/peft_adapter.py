"""A LoRA adapter trained elsewhere (`finetune.adapter_path`), checked before any heavy work.

The folder, its `adapter_config.json` (a plain LoRA: peft_type LORA, no DoRA, no extra trained
modules), its target modules against the base's linear modules and every LoRA weight's shape
against the base weight it adapts: JSON and safetensors headers only, no weights loaded. Olive
users hit adapters that do not fit their base at export (Olive issues #2277, #1451, #1583): here
they are refused before the run starts, naming the weight and both shapes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from slmflow.errors import ConfigError

FIELD = "finetune.adapter_path"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
FILES = (CONFIG, WEIGHTS)  # what the fine-tune's artifact holds, trained or given
PEFT_PREFIX = "base_model.model."  # peft's saved names: PREFIX + the base module + .lora_A.weight
RETRAIN = "give an adapter trained on this base model (model.name_or_path)"


def adapter_folder(spec: str) -> Path:
    """The checked folder of `finetune.adapter_path` (a local path or pkg:MODULE/FOLDER)."""
    from slmflow.inputs import resolve_path

    try:
        path = resolve_path(spec)
    except FileNotFoundError as exc:
        raise ConfigError(f"{FIELD}: {exc}") from None
    if not path.exists():
        raise ConfigError(f"{FIELD}: {path} does not exist; give the folder a PEFT adapter was "
                          "saved to (save_pretrained), or null to train one")
    if not path.is_dir():
        raise ConfigError(f"{FIELD}: {path} is a file; give the folder that holds {CONFIG} and "
                          f"{WEIGHTS}")
    return path


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter's config, refused unless it is a plain LoRA adapter with safetensors weights."""
    path = folder / CONFIG
    if not path.is_file():
        raise ConfigError(f"{FIELD}: {folder} has no {CONFIG}, so it is no PEFT adapter folder; "
                          "give the folder the adapter was saved to (save_pretrained)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}; fix it or "
                          "save the adapter again") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object; save the adapter again")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ConfigError(f"{FIELD}: {folder} holds a {kind!r} adapter (peft_type in {CONFIG}); "
                          "slmflow merges and exports LoRA adapters only (peft_type LORA)")
    if config.get("use_dora"):
        raise ConfigError(f"{FIELD}: {folder} is a DoRA adapter (use_dora true); slmflow merges "
                          "and exports plain LoRA adapters only: train one without DoRA")
    if config.get("modules_to_save"):
        raise ConfigError(f"{FIELD}: {folder} also trains whole modules "
                          f"{config['modules_to_save']} (modules_to_save); slmflow merges and "
                          "exports LoRA weights only: train the adapter without modules_to_save")
    targets = config.get("target_modules")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise ConfigError(f"{FIELD}: {path}: target_modules must be a list of module names, got "
                          f"{targets!r}; save the adapter with target_modules as a list")
    if not (folder / WEIGHTS).is_file():
        old = (folder / "adapter_model.bin").is_file()
        raise ConfigError(
            f"{FIELD}: {folder} has no {WEIGHTS}"
            + ("; it has adapter_model.bin: slmflow loads safetensors only: re-save the adapter "
               "with save_pretrained(..., safe_serialization=True)" if old else
               ": no adapter weights; give the folder the adapter was saved to (save_pretrained)"))
    return config


def check_targets(config: dict[str, Any], linear_modules: list[str] | None,
                  architecture: str | None) -> None:
    """Refuse target modules the base model does not have, listing the ones it has."""
    missing = [m for m in config["target_modules"] if m not in (linear_modules or [])]
    if linear_modules and missing:
        raise ConfigError(f"{FIELD}: the adapter's target_modules {sorted(missing)} are not modules "
                          f"of {architecture} (its linear modules: {linear_modules}); {RETRAIN}")


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name → shape, from a .safetensors file's header (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def check_shapes(folder: Path, base_dir: Path, config: dict[str, Any] | None = None) -> None:
    """Every LoRA weight must adapt a weight the base has, with its in and out sizes (and, per
    `config` without a rank_pattern, its rank r: the separate export's base is built for it)."""
    try:
        weights = safetensors_shapes(folder / WEIGHTS)
    except (OSError, ValueError, struct.error, KeyError, TypeError) as exc:
        raise ConfigError(f"{FIELD}: cannot read {folder / WEIGHTS} ({exc}); save the adapter "
                          "again") from None
    base: dict[str, list[int]] = {}
    for file in sorted(base_dir.glob("*.safetensors")):
        base |= safetensors_shapes(file)
    if not any(".lora_A." in k for k in weights):
        raise ConfigError(f"{FIELD}: {folder / WEIGHTS} holds no LoRA weights (lora_A, lora_B); "
                          "save the adapter again")
    for key, shape in sorted(weights.items()):
        module, sep, part = key.removeprefix(PEFT_PREFIX).partition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            raise ConfigError(f"{FIELD}: the adapter has weight {key}, no LoRA weight of a linear "
                              "module; slmflow merges and exports lora_A/lora_B weights only")
        have = base.get(f"{module}.weight")
        if have is None:
            raise ConfigError(f"{FIELD}: adapter weight {key} adapts {module}, which the base "
                              f"model in {base_dir} does not have; {RETRAIN}")
        side = shape[1] if part == "A.weight" else shape[0]  # A: r x in; B: out x r
        need = have[1] if part == "A.weight" else have[0]  # the base weight: out x in
        if len(shape) != 2 or side != need:
            raise ConfigError(f"{FIELD}: adapter weight {key} has shape {shape}, which does not fit "
                              f"{module} of the base ({have[0]} out x {have[1]} in); {RETRAIN}")
        rank = shape[0] if part == "A.weight" else shape[1]
        if config and not config.get("rank_pattern") and rank != config.get("r"):
            raise ConfigError(f"{FIELD}: adapter weight {key} has rank {rank}, its {CONFIG} says "
                              f"r {config.get('r')}; save the adapter again")


def describe(config: dict[str, Any]) -> dict[str, Any]:
    """What the report says of a given adapter's shape."""
    return {"peft_type": config["peft_type"], "r": config.get("r"),
            "alpha": config.get("lora_alpha"), "target_modules": sorted(config["target_modules"]),
            "trained_on_base": config.get("base_model_name_or_path")}
