"""Olive configs → slmflow configs: every key mapped, noted or refused, never silently dropped.

`translate_olive` reads an Olive run config (the seed's dialect or Olive 0.13's, see
`slmflow.olive_keys`) and returns a plain dict for `PipelineConfig` plus one `Note` per Olive key
saying what it became. `slmflow run --config olive-config.json` uses it (then `--set` overrides
apply in slmflow's key names); `slmflow convert-olive FILE` shows it. An AzureML system, registry
model or datastore reference translates (so the mapping can be shown) but a run stops before any
work: `check_runnable`.

Run as:
    slmflow convert-olive olive-config.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmflow.config import DataConfig
from slmflow.configio import nearest_key
from slmflow.errors import ConfigError
from slmflow.olive_handlers import Handlers, show
from slmflow.olive_keys import TABLES, WRAPPERS, Map, Noted, Refused, Section, Special

DEFAULT_LABELS = DataConfig.model_fields["labels"].default
MAX_LABELS = 50


@dataclass
class Note:
    """What one Olive key became: slmflow keys set, or "noted: ..." for a key without effect."""

    olive_key: str
    value: Any
    became: str
    targets: tuple[str, ...] = ()
    blocker: str | None = None  # set where the key asks for the AzureML target

    def __str__(self) -> str:
        return f"{self.olive_key}: {show(self.value)} → {self.became}"


def is_olive_config(data: dict) -> bool:
    """An Olive run config has `passes` or `input_model` (a slmflow config has neither)."""
    return isinstance(data, dict) and ("passes" in data or "input_model" in data)


def translate_olive(data: dict, source: str = "config") -> tuple[dict, list[Note]]:
    """Translate an Olive config into a slmflow config dict and one note per Olive key.

    Raises:
        ConfigError: a key slmflow cannot honour, a typo (with the nearest valid key), a dangling
            reference; the message names the Olive key path.
    """
    t = _Translator(source)
    t.run(data)
    return t.out, t.notes


def check_runnable(notes: list[Note], source: str = "config") -> None:
    """Stop before any work when the config asks for the AzureML target (not in this build)."""
    asked = [n.blocker for n in notes if n.blocker]
    if asked:
        raise ConfigError(
            f"{source}: this Olive config asks for AzureML ({'; '.join(asked)}), but the AzureML "
            "target is not available in this build, so nothing was run; to run locally, download "
            "the model and the data, point input_model (model_name or model_path) and data_files "
            "at the local copies, and remove engine host/target (or name a LocalSystem)"
        )


def origins(notes: list[Note]) -> dict[str, str]:
    """slmflow key → the Olive key it came from (for validation messages)."""
    return {target: n.olive_key for n in notes for target in n.targets}


class _Translator(Handlers):
    def __init__(self, source: str) -> None:
        self.source = source
        self.out: dict[str, Any] = {}
        self.notes: list[Note] = []
        self.set_by: dict[str, str] = {}  # slmflow key → Olive key path
        self.systems: dict[str, dict[str, Any]] = {}
        self.data_configs: dict[str, tuple[str, dict]] = {}
        self.used_data: set[str] = set()
        self.passes: list[tuple[str, str, str]] = []  # (kind, path, type value)
        self.model_node: dict = {}
        self.system: dict[str, Any] = {}  # the system being read
        self.pass_type = ""
        self.qlora_by: str | None = None
        self.eval_mode = False
        self.azureml_client: dict = {}

    # ---- plumbing -------------------------------------------------------------------------
    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path or '(top level)'}: {message}")

    def put(self, to: str, value: Any, path: str) -> str:
        """Set a slmflow key (refusing a second Olive key that sets it differently)."""
        if self.eval_mode and to.startswith("data."):
            to = {"data.train_file": "data.eval_file"}.get(to, to)
        node = self.out
        *parents, last = to.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if to in self.set_by and node.get(last) != value:
            raise self.error(path, f"sets {to} = {show(value)}, but {self.set_by[to]} set it to "
                                   f"{show(node.get(last))}; keep one of them")
        node[last] = value
        self.set_by.setdefault(to, path)
        return f"{to} = {show(value)}"

    def note(self, path: str, value: Any, became: str, blocker: str | None = None) -> Note:
        targets = tuple(k for k, p in self.set_by.items() if p == path)
        note = Note(path, value, became, targets, blocker)
        self.notes.append(note)
        return note

    def extend(self, path: str, text: str) -> None:
        for note in self.notes:
            if note.olive_key == path:
                note.became += f"; {text}"
                note.targets = tuple(k for k, p in self.set_by.items() if p == path)
                return

    def unknown(self, path: str, key: str, valid: list[str], what: str = "Olive key") -> ConfigError:
        near = nearest_key(key, valid) or nearest_key(key.lower(), [v.lower() for v in valid])
        if near and near not in valid:
            near = next(v for v in valid if v.lower() == near)
        hint = f"did you mean '{near}'?" if near else f"valid: {', '.join(valid)}"
        return self.error(path, f"unknown {what} {key!r}; {hint}")

    def walk(self, node: Any, table: str, path: str) -> None:
        if not isinstance(node, dict):
            raise self.error(path, f"expected a mapping, got {show(node)}")
        specs, wrapper = TABLES[table], WRAPPERS.get(table)
        for key, value in node.items():
            kpath = f"{path}.{key}" if path else key
            if key == wrapper and isinstance(value, dict):
                self.walk(value, table, kpath)
            elif key in specs:
                self.apply(specs[key], key, value, kpath, node)
            else:
                raise self.unknown(kpath, key, [*specs, *([wrapper] if wrapper else [])])

    def apply(self, spec: Any, key: str, value: Any, path: str, node: dict) -> None:
        if isinstance(spec, Section):
            if value is None:
                self.note(path, value, "noted: null: nothing to read")
            else:
                self.walk(value, spec.table, path)
        elif isinstance(spec, Map):
            if value is None:
                self.note(path, value, "noted: null: slmflow's default kept")
                return
            became = self.put(spec.to, spec.convert(value) if spec.convert else value, path)
            self.note(path, value, became + (f" ({spec.why})" if spec.why else ""))
        elif isinstance(spec, Noted):
            self.note(path, value, f"noted: {spec.why}")
        elif isinstance(spec, Refused):
            if any(value is ok if ok is None or isinstance(ok, bool) else value == ok
                   and type(value) is type(ok) for ok in spec.ok):
                self.note(path, value, f"noted: {spec.why}")
            else:
                raise self.error(path, f"not supported: {spec.why}")
        elif isinstance(spec, Special):
            getattr(self, f"_{spec.handler}")(value, path, node)

    # ---- the whole config ------------------------------------------------------------------
    def run(self, data: dict) -> None:
        if not is_olive_config(data):
            raise self.error("", "not an Olive config: it has neither passes nor input_model")
        top = {**TABLES["ENGINE"], **TABLES["TOP"]}
        for key in data:
            if key not in top:
                raise self.unknown(key, key, list(top))
        for key in ("input_model", "passes"):
            if key not in data:
                raise self.error(key, "required: an Olive config for slmflow names the base model "
                                      "(input_model) and the fine-tuning pass (passes)")
        self.azureml_client = data.get("azureml_client") or {}
        order = ["systems", "data_configs", "azureml_client", "input_model", "passes", "engine"]
        for key in sorted(data, key=lambda k: order.index(k) if k in order else len(order)):
            self.apply(top[key], key, data[key], key, data)
        self.finish()

    def finish(self) -> None:
        kinds = [kind for kind, _, _ in self.passes]
        tuning = [p for p in self.passes if p[0] in ("lora", "qlora")]
        if len(tuning) != 1:
            raise self.error("passes", f"slmflow runs one LoRA or QLoRA pass, found {len(tuning)}; "
                                       "its pipeline is fine-tune → merge → export")
        rank = {"lora": 0, "qlora": 0, "merge": 1, "builder": 2}
        if [rank[k] for k in kinds] != sorted(rank[k] for k in kinds) or len(set(kinds)) < len(kinds):
            raise self.error("passes", f"slmflow runs fine-tune → merge → export; the passes here "
                                       f"are in another order or repeat: {[p[2] for p in self.passes]}")
        kind, path, _ = tuning[0]
        names = [p[1].split(".")[1] for p in self.passes]
        method = "qlora" if kind == "qlora" or self.qlora_by else "lora"
        self.put("finetune.method", method, path)
        why = f" ({self.qlora_by} in a LoRA pass: QLoRA)" if kind == "lora" and self.qlora_by else ""
        self.extend(path, f"finetune.method = {show(method)}{why}")
        if "merge" not in kinds:
            self.note("passes", names, "noted: no MergeAdapterWeights pass: slmflow merges the "
                                      "adapter into the base before exporting anyway")
        if "builder" not in kinds:
            self.note("passes", names, "noted: no ModelBuilder pass: slmflow exports the merged "
                                      "model anyway (export.*, int4 by default)")
        for name, (path, _) in self.data_configs.items():
            if name not in self.used_data:
                self.note(path, name, "noted: no pass names this data config; not used")
        if "name_or_path" not in self.out.get("model", {}):
            raise self.error("input_model", "name the base model: model_path (Olive 0.13) or "
                                            "config.hf_config.model_name (a hub id or local folder)")
        self.out["model"].setdefault("source", "hf")
        data = self.out.get("data", {})
        if "text_columns" in data and "text_template" not in data:
            cols, origin = data["text_columns"], self.set_by["data.text_columns"]
            template = " ".join("{" + c + "}" for c in cols)
            self.extend(origin, f"{self.put('data.text_template', template, origin)}; "
                        f"{self.put('data.label_column', cols[-1], origin)} (no text_template: "
                        "Olive joins text_cols with spaces; the last column is the label)")
        self.labels()

    def labels(self) -> None:
        """data.labels: the distinct values of the label column, read from a local data file."""
        data = self.out.get("data", {})
        column, spec = data.get("label_column"), data.get("train_file")
        if not column or not spec:
            return
        origin = self.set_by["data.train_file"]
        default = f"data.labels: slmflow's default {show(DEFAULT_LABELS)}"
        if spec.startswith(("hf:", "azureml:")):
            self.extend(origin, f"{default} (not read from there; set data.labels with --set)")
            return
        from slmflow.dataio import read_rows
        from slmflow.errors import DataError

        try:
            _, rows = read_rows(spec)
        except DataError as exc:
            self.extend(origin, f"{default} (could not read the file: {exc})")
            return
        values = list(dict.fromkeys(str(r[column]).strip() for _, r in rows if column in r))
        if len(values) > MAX_LABELS:
            raise self.error(self.set_by["data.label_column"], f"the label column {column!r} "
                             f"(the template's last placeholder) has {len(values)} distinct values "
                             f"in {spec}: slmflow fine-tunes classifiers (a small label set)")
        if not values:  # no such column there: the data check names it, with the file and line
            self.extend(origin, f"{default} (no column {column!r} in the file)")
        elif set(values) == set(DEFAULT_LABELS):
            self.extend(origin, f"{default} (the distinct values of {column!r} there)")
        else:
            self.extend(origin, self.put("data.labels", values, origin)
                        + f" (the distinct values of {column!r} there)")


SECTIONS = [  # README table order: (table, how its keys are written)
    ("TOP", "{}"), ("ENGINE", "engine.{}"),
    ("INPUT_MODEL", "input_model[.config].{}"), ("HF_CONFIG", "input_model.config.hf_config.{}"),
    ("LOAD_KWARGS", ("input_model[.config].load_kwargs.{} (seed: hf_config.model_loading_args or "
                    "from_pretrained_args)")),
    ("DATA_CONFIG", "data_configs[].{}"),
    ("LOAD_DATASET", "data_configs[].load_dataset_config[.params].{}"),
    ("PRE_PROCESS", "data_configs[].pre_process_data_config[.params].{}"),
    ("PASS", "passes.NAME[.config].{} (every pass)"),
    ("LORA_ONLY", "passes.NAME[.config].{} (LoRA, QLoRA)"),
    ("TRAINING_ARGS", "passes.NAME[.config].training_args[.extra_args].{}"),
    ("BUILDER_ONLY", "passes.NAME[.config].{} (ModelBuilder)"),
    ("SYSTEM", "systems.NAME[.config].{}"),
]


def describe(spec: Any) -> str:
    """What slmflow does with a key, in words (the README's second column)."""
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
    """The README's table: every Olive key slmflow knows and what it does with it.

    Keys of one section that slmflow treats alike share a row.
    """
    tables = dict(TABLES)
    tables["LORA_ONLY"] = {k: v for k, v in TABLES["LORA"].items() if k not in TABLES["PASS"]}
    tables["BUILDER_ONLY"] = {k: v for k, v in TABLES["BUILDER"].items() if k not in TABLES["PASS"]}
    lines = ["| Olive key | what slmflow does |", "|---|---|"]
    for name, pattern in SECTIONS:
        rows: dict[str, list[str]] = {}
        for key, spec in tables[name].items():
            if not isinstance(spec, Section):
                rows.setdefault(describe(spec).replace("|", "\\|"), []).append(key)
        prefix, _, where = pattern.partition(" ")
        for text, keys in rows.items():
            cell = ", ".join([f"`{prefix.format(keys[0])}`", *(f"`{k}`" for k in keys[1:])])
            lines.append(f"| {cell}{' ' + where if where else ''} | {text} |")
    return "\n".join(lines)


def convert_olive(path: str | Path) -> str:
    """`slmflow convert-olive FILE`: the slmflow config as YAML, then what each Olive key became."""
    import yaml

    from slmflow.configio import build_config, read_config_file

    data = read_config_file(path)
    out, notes = translate_olive(data, str(path))
    config = build_config(out, source=str(path), origins=origins(notes))
    text = yaml.safe_dump(config.model_dump(mode="json", exclude={"notes"}), sort_keys=False,
                          allow_unicode=True)
    rows = ["| Olive key | value | what it became |", "|---|---|---|"]
    cell = lambda text: str(text).replace("|", "\\|")
    rows += [f"| {n.olive_key} | {cell(show(n.value, 40))} | {cell(n.became)} |" for n in notes]
    try:
        check_runnable(notes, str(path))
        tail = ""
    except ConfigError as exc:
        tail = f"\nnot runnable in this build: {exc}\n"
    return f"{text}\n" + "\n".join(rows) + "\n" + tail
