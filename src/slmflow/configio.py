"""Load a PipelineConfig from JSON/YAML and `--set` overrides, with errors a user can act on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from slmflow import olive
from slmflow.config import PipelineConfig
from slmflow.errors import ConfigError
from slmflow.suggest import nearest_key

# More than any config needs: a deeper or bigger file is a mistake or a YAML alias bomb (aliases
# expand wherever a value is printed or validated, to billions of values).
MAX_DEPTH, MAX_VALUES = 64, 10_000


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a JSON or YAML config file into a dict, naming line and column on syntax errors."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist: check the path")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder: pass a .yaml or .json file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror}): check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"config file {path}:{line}:{col} is not UTF-8 text (byte {exc.start}): save it as UTF-8"
        ) from None
    if not text.strip():
        raise ConfigError(f"config file {path} is empty: write a config or leave --config out")
    try:
        data = _parse_json(text, path) if path.suffix.lower() == ".json" else _parse_yaml(text, path)
    except RecursionError:  # the parsers recurse once per level
        raise ConfigError(f"{path}: nested too deeply to read (a config needs a few levels); "
                          "fix the brackets or the indentation") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (model, data, finetune, ...), "
            f"not a {type(data).__name__}"
        )
    _check_size(data, path)
    return data


def _parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}; fix the JSON there "
            "(a trailing comma, a missing quote or bracket?)"
        ) from None


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        opened = f" ({context} at line {start.line + 1}, column {start.column + 1})" if (
            context and start and mark and start.line != mark.line) else ""
        raise ConfigError(
            f"{where}: invalid YAML: {problem}{opened}; fix the YAML there (indent with "
            "spaces, close brackets and quotes)"
        ) from None


def _check_size(data: Any, path: Path) -> None:
    """Refuse a config nested deeper, or holding more values, than any config needs."""
    stack, count = [(data, 1)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise ConfigError(f"{path}: nested more than {MAX_DEPTH} levels deep; a config needs a "
                              "few: fix the brackets or the indentation")
        if count > MAX_VALUES:
            raise ConfigError(f"{path}: holds more than {MAX_VALUES} values (a YAML alias counts "
                              "each time it is used); a config needs a few hundred")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides; values parse as YAML scalars (1e-4, true, [a, b])."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. finetune.r=8")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError):
            value = raw
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is {child!r}, not a section; "
                                  f"fix {part} in the config or the key of --set")
            node = child
        node[parts[-1]] = value
    return data


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the (nested) model section that `loc` points into."""
    current: Any = model
    for part in loc:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            break
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            current = annotation
        else:
            break
    return list(current.model_fields)


def format_validation_error(
    exc: ValidationError,
    model: type[BaseModel] = PipelineConfig,
    source: str = "config",
    origins: dict[str, str] | None = None,
) -> str:
    """One line per problem, joined: the key path, what is wrong, and the fix.

    `origins` (slmflow key → Olive key) names the Olive key behind a translated value.
    """
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if origins:
            key = path if path in origins else ".".join(str(p) for p in loc[:2])
            behind = [origins[key]] if key in origins else [
                o for k, o in origins.items() if k.startswith(path + ".")]
            if behind:
                path = f"{path} (from Olive {', '.join(dict.fromkeys(behind[:3]))})"
        if err["type"] == "extra_forbidden":
            valid = _fields_at(model, loc[:-1])
            near = nearest_key(str(loc[-1]), valid)
            hint = f"did you mean '{near}'?" if near else f"valid keys: {', '.join(valid)}"
            problems.append(f"{path}: unknown key; {hint}")
        elif err["type"] == "literal_error":
            problems.append(f"{path}: {err['msg']} (got {_shown(err.get('input'))})")
        elif err["type"] == "missing":
            problems.append(f"{path}: required key is missing")
        elif err["type"] in ("model_type", "model_attributes_type", "dict_type"):
            valid = _fields_at(model, loc) if err["type"] != "dict_type" else []
            keys = f" of keys ({', '.join(valid[:4])}, ...)" if valid else " (KEY: VALUE)"
            problems.append(f"{path}: must be a mapping{keys}, got {_shown(err.get('input'))}")
        elif err["type"] == "list_type":
            problems.append(f"{path}: must be a list, e.g. [a, b], got {_shown(err.get('input'))}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {_shown(got)})"
            problems.append(f"{path}: {msg}{shown}")
    return f"{source}: " + "; ".join(problems)


def _shown(value: Any, width: int = 80) -> str:
    """A wrong value in a message, cut short: a 5,000-character value would bury the fix."""
    text = repr(value)
    return text if len(text) <= width else f"{text[: width - 1]}…"


def build_config(
    data: dict[str, Any], source: str = "config", origins: dict[str, str] | None = None
) -> PipelineConfig:
    """Validate a dict into a PipelineConfig, raising ConfigError with every problem named."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=source, origins=origins)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """The config of a run: the embedded default, or a file, plus `--set` overrides.

    An Olive config (it has `passes` or `input_model`) is translated first (`slmflow.olive`): what
    each Olive key became goes into `notes`; `--set` overrides then apply in slmflow's key names.
    A config that runs on an AzureML system (host/target) stops here, before any work.
    """
    data: dict[str, Any] = {} if path is None else read_config_file(path)
    source = "config" if path is None else str(path)
    origins = None
    if path is not None and olive.is_olive_config(data):
        data, notes = olive.translate_olive(data, source)
        olive.check_runnable(notes, source)
        data["notes"] = [str(n) for n in notes]
        origins = olive.origins(notes)
    data = apply_overrides(data, list(overrides or []))
    return build_config(data, source=source, origins=origins)


def convert_olive_file(path: str | Path) -> str:
    """`slmflow convert-olive FILE`: the slmflow config as YAML, then what each Olive key became."""
    data = read_config_file(path)
    out, notes = olive.translate_olive(data, str(path))
    config = build_config(out, source=str(path), origins=olive.origins(notes))
    return olive.convert_olive(config, notes, str(path))


def dump_config(config: PipelineConfig) -> str:
    """The resolved config as YAML, every default written out."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def config_reference() -> str:
    """The config reference as a Markdown table (docs/config.md's, kept in sync by a test)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                lines.append(f"| **`{prefix}{name}`** | | {(ann.__doc__ or '').splitlines()[0]} |")
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            shown = default.replace("\n", "\\n") if isinstance(default, str) else json.dumps(default)
            desc = (field.description or field.title or "").replace("|", "\\|")
            lines.append(f"| `{prefix}{name}` | `{shown}` | {desc} |")

    walk(PipelineConfig, "")
    return "\n".join(lines)
