"""The valid key a mistyped or foreign key most likely means (config and Olive messages).

A module of its own so that `slmflow.configio` and `slmflow.olive` both use it without importing
each other.
"""

from __future__ import annotations

import difflib

# Names users bring from peft, transformers and Olive for slmflow's keys.
ALIASES = {
    "lora_r": "r", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "lr": "learning_rate", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "bnb_4bit_quant_type": "quant_type", "double_quantization": "double_quant",
    "torch_dtype": "dtype", "model_name": "name_or_path", "data_files": "train_file",
    "source_max_len": "max_seq_len", "max_seq_length": "max_seq_len", "data_seed": "seed",
    "save_steps": "checkpoint_every", "lr_scheduler_type": "lr_scheduler",
}


def nearest_key(name: str, valid: list[str]) -> str | None:
    """The valid key a mistyped or foreign key most likely means."""
    if ALIASES.get(name) in valid:
        return ALIASES[name]
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        return close[0]
    return next((v for v in valid if name.endswith("_" + v) or name.startswith(v + "_")), None)


def gate_hints(config: dict, merged_into: str | None = None) -> list[str]:
    """What to try after a failed quality gate, given what the run configured (its config as
    report.json keeps it): never the setting already in use. `merged_into`: the base the merge
    used (the report's merge.base_weights, auto resolved)."""
    export, evaluate = config.get("export", {}), config.get("evaluate", {})
    hints = []
    if export.get("recipe") != "auto":
        hints.append("export.recipe=auto (exports every candidate recipe, keeps the smallest "
                     "within the gate)")
        higher = {"int4": "int8", "int8": "fp16"}.get(export.get("precision", ""))
        if higher:
            hints.append(f"export.precision={higher}")
    elif "int8" not in (export.get("search") or {}).get("candidates", ["int8"]):
        hints.append("int8 in export.search.candidates")
    if config.get("finetune", {}).get("method") == "qlora":
        other = {"original": "dequantized", "dequantized": "original"}.get(
            merged_into or config.get("merge", {}).get("base_weights", ""))
        if other:
            hints.append(f"merge.base_weights={other} (the other base the QLoRA adapter can be "
                         "merged into: the merge's report gives both forms' distance to the "
                         "trained model)")
    drop = evaluate.get("max_accuracy_drop")
    hints.append("a larger evaluate.max_accuracy_drop" + (f" (now {drop})" if drop is not None else ""))
    return hints
