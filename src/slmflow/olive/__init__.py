"""Olive configs → slmflow configs: every key mapped, noted or refused, never silently dropped.

`translate_olive` reads an Olive run config (the seed's dialect or Olive 0.13's) and returns a
plain dict for `PipelineConfig` plus one `Note` per Olive key saying what it became. `slmflow run
--config olive-config.json` uses it (then `--set` overrides apply in slmflow's key names);
`slmflow convert-olive FILE` shows it. AzureML registry models and datastore files translate into
slmflow's own AzureML inputs; a config that runs on an AzureML system (host/target) stops before
any work (`check_runnable`): slmflow runs on AzureML through its `azureml` work pool.

One module per Olive section, each with its key table beside its handlers: `model`, `data`,
`passes`, `systems`, `engine` (the top level and the whole translation); `core` holds the spec
types and the translator's plumbing; `reference` renders docs/olive.md's table and convert-olive.

Run as:
    slmflow convert-olive olive-config.json
"""

from __future__ import annotations

from slmflow.olive.core import Note
from slmflow.olive.engine import translate
from slmflow.olive.reference import convert_olive, olive_reference
from slmflow.olive.systems import check_runnable

__all__ = ["Note", "check_runnable", "convert_olive", "is_olive_config", "olive_reference",
           "origins", "translate_olive"]


def is_olive_config(data: dict) -> bool:
    """An Olive run config has `passes` or `input_model` (a slmflow config has neither)."""
    return isinstance(data, dict) and ("passes" in data or "input_model" in data)


def translate_olive(data: dict, source: str = "config") -> tuple[dict, list[Note]]:
    """Translate an Olive config into a slmflow config dict and one note per Olive key.

    Raises:
        ConfigError: a key slmflow cannot honour, a wrong value (the key and the fix), a typo
            (with the nearest valid key), a dangling reference; the message names the Olive key path.
    """
    t = translate(data, source)
    return t.out, t.notes


def origins(notes: list[Note]) -> dict[str, str]:
    """slmflow key → the Olive key it came from (for validation messages)."""
    return {target: n.olive_key for n in notes for target in n.targets}
