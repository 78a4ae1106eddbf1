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
