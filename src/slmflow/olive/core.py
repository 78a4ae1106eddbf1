"""The translator's spec types, its notes and its plumbing, shared by the section modules.

Each section module (`model`, `data`, `passes`, `systems`, `engine`) lists its Olive keys in a
`Table`: `Map` copies the value to a slmflow key, `Noted` accepts it without effect (with the
reason), `Refused` stops with the reason (unless the value asks for nothing slmflow does not do),
`Special` calls a handler `handler(t, value, path, node)` of that module, `Section` is a nested
mapping read with its own table. `Translator` holds the slmflow dict being built, the notes, and
what one section leaves for another (systems for engine.target, data configs for the passes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slmflow.errors import ConfigError
from slmflow.suggest import nearest_key

Handler = Callable[["Translator", Any, str, dict], None]


@dataclass(frozen=True)
class Map:
    """The value goes to the slmflow key `to` (dotted), through `convert` when given."""

    to: str
    why: str = ""
    convert: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Noted:
    """Accepted without effect: `why` says what slmflow does instead."""

    why: str


@dataclass(frozen=True)
class Refused:
    """Refused with `why`, unless the value is one of `ok` (Olive's default or slmflow's way)."""

    why: str
    ok: tuple = (None,)


@dataclass(frozen=True)
class Special:
    """Read by `handler(translator, value, path, node)`; `doc` is its line in docs/olive.md."""

    handler: Handler
    doc: str


@dataclass(eq=False)
class Table:
    """The keys of one Olive section; Olive may nest them under `wrapper` (config, params)."""

    keys: dict[str, Any]
    wrapper: str | None = None


@dataclass(frozen=True)
class Section:
    """A nested mapping, read with `table`."""

    table: Table


@dataclass
class Note:
    """What one Olive key became: slmflow keys set, or "noted: ..." for a key without effect."""

    olive_key: str
    value: Any
    became: str
    targets: tuple[str, ...] = ()
    blocker: str | None = None  # set where the key asks to run on an AzureML system

    def __str__(self) -> str:
        return f"{self.olive_key}: {show(self.value)} → {self.became}"


def show(value: Any, width: int = 60) -> str:
    """A value as short JSON, for notes and messages (YAML's dates and the like as text)."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def quoted(name: Any, width: int = 60) -> str:
    """A key or name as Python quotes it, cut short (a message stays readable)."""
    text = repr(str(name))
    return text if len(text) <= width else text[: width - 2] + "…'"


def given(value: Any) -> str:
    """A value in a message: text in Python's quotes, anything else as JSON."""
    return quoted(value) if isinstance(value, str) else show(value)


def is_number(value: Any) -> bool:
    """An int or a finite float; not a bool (JSON's true is no number)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_text_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


@dataclass
class Translator:
    """One translation: the slmflow dict, the notes, and what sections leave for each other."""

    source: str
    out: dict[str, Any] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)
    set_by: dict[str, str] = field(default_factory=dict)  # slmflow key → Olive key path
    systems: dict[str, dict[str, Any]] = field(default_factory=dict)
    system: dict[str, Any] = field(default_factory=dict)  # the system being read
    data_configs: dict[str, tuple[str, dict]] = field(default_factory=dict)
    used_data: set[str] = field(default_factory=set)
    passes: list[tuple[str, str, str, Any]] = field(default_factory=list)  # kind, name, path, type
    pass_type: str = ""
    qlora_by: str | None = None  # the quantization key that makes a LoRA pass QLoRA
    model_node: dict = field(default_factory=dict)  # input_model with its config merged in
    eval_mode: bool = False  # reading eval_data_config: data.train_file means data.eval_file
    azureml_client: Any = None  # the top-level workspace of azureml_datastore references

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path or '(top level)'}: {message}")

    def put(self, to: str, value: Any, path: str) -> str:
        """Set a slmflow key (refusing a second Olive key that sets it differently)."""
        if self.eval_mode and to == "data.train_file":
            to = "data.eval_file"
        node = self.out
        *parents, last = to.split(".")
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                inner = ".".join(parents[: i + 1])
                raise self.error(path, f"sets {to}, but {self.set_by.get(inner, 'another key')} "
                                       f"set {inner} to a value; keep one of them")
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
        """Add to the note of `path` (what a later step derived from that key)."""
        for note in self.notes:
            if note.olive_key == path:
                note.became += f"; {text}"
                note.targets = tuple(k for k, p in self.set_by.items() if p == path)
                return

    def unknown(self, path: str, key: Any, valid: list[str], what: str = "Olive key") -> ConfigError:
        key = str(key)
        near = nearest_key(key, valid) or nearest_key(key.lower(), [v.lower() for v in valid])
        if near and near not in valid:
            near = next(v for v in valid if v.lower() == near)
        hint = f"did you mean '{near}'?" if near else f"valid: {', '.join(valid)}"
        return self.error(path, f"unknown {what} {quoted(key)}; {hint}")

    def mapping(self, value: Any, path: str, what: str = "a mapping") -> dict:
        if not isinstance(value, dict):
            raise self.error(path, f"expected {what}, got {show(value)}")
        return value

    def walk(self, node: Any, table: Table, path: str) -> None:
        """Read every key of `node` with `table` (keys under its wrapper too)."""
        self.mapping(node, path)
        for key, value in node.items():
            kpath = f"{path}.{key}" if path else str(key)
            if key == table.wrapper and value is None:
                self.note(kpath, value, "noted: null: nothing to read")
            elif key == table.wrapper:
                self.walk(value, table, kpath)
            elif key in table.keys:
                self.apply(table.keys[key], value, kpath, node)
            else:
                raise self.unknown(kpath, key, [*table.keys, *filter(None, [table.wrapper])])

    def apply(self, spec: Any, value: Any, path: str, node: dict) -> None:
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
            if any(_same(value, ok) for ok in spec.ok):
                self.note(path, value, f"noted: {spec.why}")
            else:
                raise self.error(path, f"not supported: {spec.why}")
        else:
            spec.handler(self, value, path, node)


def _same(value: Any, ok: Any) -> bool:
    """`value` is the accepted `ok` (true is not 1, 0.0 is not false)."""
    if ok is None or isinstance(ok, bool):
        return value is ok
    return type(value) is type(ok) and value == ok
