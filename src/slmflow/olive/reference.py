"""What slmflow does with each Olive key, in words: docs/olive.md's table (`olive_reference`) and
the output of `slmflow convert-olive` (`convert_olive`).
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from slmflow.errors import ConfigError
from slmflow.olive.core import Map, Note, Noted, Refused, Section, Table, show
from slmflow.olive.data import DATA_CONFIG, LOAD_DATASET, PRE_PROCESS
from slmflow.olive.engine import CACHE_CONFIG, ENGINE, TOP
from slmflow.olive.model import HF_CONFIG, INPUT_MODEL, LOAD_KWARGS
from slmflow.olive.passes import BUILDER_ONLY, EXTRACT_ONLY, LORA_ONLY, PASS, TRAINING_ARGS
from slmflow.olive.systems import SYSTEM, check_runnable

SECTIONS: list[tuple[Table, str]] = [  # the table's order: (keys, how they are written)
    (TOP, "{}"), (ENGINE, "engine.{}"), (CACHE_CONFIG, "engine.cache_config.{}"),
    (INPUT_MODEL, "input_model[.config].{}"), (HF_CONFIG, "input_model.config.hf_config.{}"),
    (LOAD_KWARGS, ("input_model[.config].load_kwargs.{} (seed: hf_config.model_loading_args or "
                   "from_pretrained_args)")),
    (DATA_CONFIG, "data_configs[].{}"),
    (LOAD_DATASET, "data_configs[].load_dataset_config[.params].{}"),
    (PRE_PROCESS, "data_configs[].pre_process_data_config[.params].{}"),
    (Table(PASS), "passes.NAME[.config].{} (every pass)"),
    (Table(LORA_ONLY), "passes.NAME[.config].{} (LoRA, QLoRA)"),
    (TRAINING_ARGS, "passes.NAME[.config].training_args[.extra_args].{}"),
    (Table(BUILDER_ONLY), "passes.NAME[.config].{} (ModelBuilder)"),
    (Table(EXTRACT_ONLY), "passes.NAME[.config].{} (ExtractAdapters)"),
    (SYSTEM, "systems.NAME[.config].{}"),
]


def describe(spec: Any) -> str:
    """What slmflow does with a key, in words (the table's second column)."""
    if isinstance(spec, Map):
        return f"→ `{spec.to}`" + (f" ({spec.why})" if spec.why else "")
    if isinstance(spec, Noted):
        return f"noted: {spec.why}"
    if isinstance(spec, Refused):
        ok = [v for v in spec.ok if v is not None]
        accepted = f" (accepted: {', '.join(json.dumps(v) for v in ok)})" if ok else ""
        return f"refused: {spec.why}{accepted}"
    return spec.doc


def olive_reference() -> str:
    """docs/olive.md's table: every Olive key slmflow knows and what it does with it.

    Keys of one section that slmflow treats alike share a row.
    """
    lines = ["| Olive key | what slmflow does |", "|---|---|"]
    for table, pattern in SECTIONS:
        rows: dict[str, list[str]] = {}
        for key, spec in table.keys.items():
            if not isinstance(spec, Section):
                rows.setdefault(describe(spec).replace("|", "\\|"), []).append(key)
        prefix, _, where = pattern.partition(" ")
        for text, keys in rows.items():
            cell = ", ".join([f"`{prefix.format(keys[0])}`", *(f"`{k}`" for k in keys[1:])])
            lines.append(f"| {cell}{' ' + where if where else ''} | {text} |")
    return "\n".join(lines)


def convert_olive(config: Any, notes: list[Note], source: str) -> str:
    """`slmflow convert-olive FILE`'s output: the validated slmflow config (a PipelineConfig) as
    YAML, then what each Olive key became, then why it would not run, if it would not."""
    text = yaml.safe_dump(config.model_dump(mode="json", exclude={"notes"}), sort_keys=False,
                          allow_unicode=True)
    rows = ["| Olive key | value | what it became |", "|---|---|---|"]

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    rows += [f"| {cell(n.olive_key)} | {cell(show(n.value, 40))} | {cell(n.became)} |"
             for n in notes]
    try:
        check_runnable(notes, source)
        tail = ""
    except ConfigError as exc:
        tail = f"\nnot runnable here: {exc}\n"
    return f"{text}\n" + "\n".join(rows) + "\n" + tail
