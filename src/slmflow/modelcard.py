"""`slmflow_model.json`: what the published model folder needs to be used on its own.

`OUTPUT_DIR/model/` holds onnxruntime-genai's files (`genai_config.json`, `model.onnx`, the
tokenizer) and, beside them, this small file (written when the model is published, so the export
stage's output and every cache key stay as they were):

```json
{
  "format": "slmflow-classifier",      // what reads it: slmflow.classifier
  "format_version": 1,                 // a reader refuses a newer one
  "prompt_template": "### Text: {phrase}\\n### The tone is:\\n",   // str.format over...
  "input_columns": ["phrase"],         // ...these columns (one string fills a single column)
  "label_column": "tone",
  "labels": ["Sad", "Joy", "Fear", "Surprise"],
  "answer_rule": "prefix",             // the label the answer starts with (exact case first,
                                       // then any case), else "(other)": evaluate.parse_answer
  "max_new_tokens": 8,                 // evaluate.max_new_tokens (capped at the longest label + 1)
  "guidance": {"type": "regex", "data": "(Sad|Joy|Fear|Surprise)"},   // constrained answers
  "tokenizer": "transformers",         // prompt ids: AutoTokenizer(folder)(prompt), with its
                                       // special tokens, as the evaluation tokenized them
  "adapters": null,                    // a merged model; the separate form: see below
  "given_adapter": null                // or, for an adapter given, not trained
                                       // (finetune.adapter_path): {"adapter_path", "sha256"}
}
```

The separate form (`export.adapters: separate`, `slmflow bundle`): `adapters` is
`{"base_version", "lora": {"target_modules", "r"}, "default": NAME, "files": {NAME: {"file":
"NAME.onnx_adapter", "sha256", "base_version", "trained_on", "card": {this task's fields}}}}` and
the top-level fields are the default adapter's (`slmflow.bundle`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmflow.errors import SlmflowError

CARD = "slmflow_model.json"
FORMAT = "slmflow-classifier"
FORMAT_VERSION = 1


class ModelFolderError(SlmflowError):
    """A folder that is not a usable published slmflow model (exit 2, one line)."""


def build_card(config: Any, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card of a run's model, from its whole config (`PipelineConfig` or its JSON dump) and
    its manifest's inputs (the given adapter's sha256)."""
    from slmflow.generate import label_regex
    from slmflow.textformat import split_template, template_fields

    cfg = config if isinstance(config, dict) else config.model_dump(mode="json")
    data = cfg["data"]
    head, _ = split_template(data["text_template"], data["label_column"])
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "prompt_template": head,
        "input_columns": template_fields(head),
        "label_column": data["label_column"],
        "labels": list(data["labels"]),
        "answer_rule": "prefix",
        "max_new_tokens": cfg["evaluate"]["max_new_tokens"],
        "guidance": {"type": "regex", "data": label_regex(list(data["labels"]))},
        "tokenizer": "transformers",
        "adapters": None,
        "given_adapter": given_adapter(cfg, inputs),
    }


def given_adapter(cfg: dict[str, Any], inputs: dict[str, Any] | None) -> dict[str, Any] | None:
    """Where a given adapter (finetune.adapter_path) came from; None for one the run trained."""
    path = (cfg.get("finetune") or {}).get("adapter_path")
    if not path:
        return None
    return {"adapter_path": path, "sha256": ((inputs or {}).get("adapter_source") or {}).get("sha256")}


def write_card(folder: Path, config: Any, inputs: dict[str, Any] | None = None) -> Path:
    path = Path(folder) / CARD
    path.write_text(json.dumps(build_card(config, inputs), indent=2, ensure_ascii=False) + "\n")
    return path


def read_card(folder: str | Path) -> dict[str, Any]:
    """The card of a published folder; ModelFolderError says what is wrong and what to do."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist; give the OUTPUT_DIR/model "
                               "folder of a finished `slmflow run`")
    if not (folder / "genai_config.json").is_file():
        raise ModelFolderError(f"{folder} holds no genai_config.json: not an exported model; give "
                               "the OUTPUT_DIR/model folder of a finished `slmflow run`")
    path = folder / CARD
    if not path.is_file():
        raise ModelFolderError(f"{folder} has no {CARD}: it was published by an older slmflow; "
                               "run `slmflow run` again with the same config (every stage is "
                               "cached) to republish it")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{path} is not valid JSON ({exc}); republish with `slmflow run`") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ModelFolderError(f"{path} is not an slmflow model card (format {FORMAT!r} expected)")
    if not isinstance(card.get("format_version"), int) or card["format_version"] > FORMAT_VERSION:
        raise ModelFolderError(f"{path} has format_version {card.get('format_version')!r}; this "
                               f"slmflow reads up to {FORMAT_VERSION}: upgrade slmflow")
    missing = [k for k in ("prompt_template", "input_columns", "labels", "max_new_tokens",
                           "guidance") if k not in card]
    if missing:
        raise ModelFolderError(f"{path} lacks {missing}; republish with `slmflow run`")
    return card


def adapter_files(folder: Path, card: dict[str, Any]) -> dict[str, Path]:
    """{name: file} of a separate-form folder ({} for a merged model), each file checked: present,
    and exported for this base build (its model version), else one line saying what to do."""
    block = card.get("adapters")
    if not block:
        return {}
    from slmflow.errors import StageCheckError
    from slmflow.onnx_adapters import check_adapter_file

    files = {}
    for name, entry in block["files"].items():
        path = Path(folder) / entry["file"]
        if not path.is_file():
            raise ModelFolderError(f"{folder} lacks adapter file {entry['file']} named in {CARD}; "
                                   "publish the folder again (slmflow run or slmflow bundle)")
        try:
            check_adapter_file(path, int(block["base_version"]), f"the base in {folder}")
        except StageCheckError as exc:
            raise ModelFolderError(str(exc)) from None
        files[name] = path
    return files
