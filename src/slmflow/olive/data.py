"""Olive's `data_configs` → slmflow's `data.*`: the file (local, hf:NAME or an AzureML datastore),
the text template, the corpus strategy, and the label set read from the file.

A data config is read where a pass names it (`passes` reads it with `DATA_CONFIG`); a data
config no pass names is noted as unused.
"""

from __future__ import annotations

from typing import Any

from slmflow.config import DataConfig
from slmflow.olive.core import (
    Map,
    Noted,
    Refused,
    Section,
    Special,
    Table,
    Translator,
    given,
    is_text_list,
    quoted,
    show,
)
from slmflow.olive.model import TASK
from slmflow.pathcheck import path_problem

DEFAULT_LABELS = DataConfig.model_fields["labels"].default
MAX_LABELS = 50
FILE_LOADERS = ("json", "csv", "parquet")
STRATEGIES = {"line-by-line": "line_by_line", "line_by_line": "line_by_line", "join": "join"}
OTHER_STRATEGIES = ("line-by-line-random", "join-random", "join-sliding-window")
DATASTORE_KEYS = ["type", "config", "azureml_client", "datastore_name", "relative_path"]
WORKSPACE_KEYS = ("subscription_id", "resource_group", "workspace_name")


def handle_data_configs(t: Translator, value: Any, path: str, node: dict) -> None:
    if not isinstance(value, list):
        raise t.error(path, f"expected a list of data configs, got {show(value)}")
    for i, dc in enumerate(value):
        name = dc.get("name") if isinstance(dc, dict) else None
        if not isinstance(name, str):
            raise t.error(f"{path}[{i}].name", "required: a data config is a mapping with a name, "
                                               "which passes refer to")
        if name in t.data_configs:
            raise t.error(f"{path}[{i}].name", f"{quoted(name)} is used twice; give each data "
                                               "config its own name")
        t.data_configs[name] = (f"{path}[{i}]", dc)


def data_config_named(t: Translator, value: Any, path: str) -> tuple[str, dict]:
    """The data config a pass names (or gives inline, as older Olive does) and where it is."""
    if isinstance(value, dict):
        return path, value
    if not (isinstance(value, str) and value in t.data_configs):
        raise t.unknown(path, value if isinstance(value, str) else show(value),
                        list(t.data_configs), "data config")
    t.used_data.add(value)
    return t.data_configs[value]


def handle_data_type(t: Translator, value: Any, path: str, node: dict) -> None:
    if str(value).lower() != "huggingfacecontainer":
        raise t.error(path, f"not supported: {given(value)}; slmflow reads files like "
                            "HuggingfaceContainer (json/jsonl/csv/parquet or hf:NAME)")
    t.note(path, value, "noted: slmflow reads the data itself (.json/.jsonl/.csv/.parquet)")


def handle_component_type(t: Translator, value: Any, path: str, node: dict) -> None:
    ok = (("huggingface_dataset",) if "load_dataset" in path else
          ("huggingface_pre_process", "text_generation_huggingface_pre_process"))
    if str(value).lower() not in ok:
        raise t.error(path, f"not supported: {given(value)}; slmflow offers {', '.join(ok)}")
    t.note(path, value, "noted: slmflow's own loader / template rendering")


def handle_data_name(t: Translator, value: Any, path: str, node: dict) -> None:
    if value in FILE_LOADERS:
        t.note(path, value, "noted: datasets' file loader; slmflow reads data_files itself")
    elif not isinstance(value, str) or path_problem(f"hf:{value}"):
        raise t.error(path, f"expected json, csv, parquet or a Hugging Face dataset id (NAME or "
                            f"ORG/NAME), got {given(value)}")
    elif node.get("data_files") is not None:
        raise t.error(path, f"not supported: data_files with data_name {quoted(value)}; use "
                            "data_name json, csv or parquet for a file")
    else:
        t.note(path, value, t.put("data.train_file", f"hf:{value}", path))


def handle_data_files(t: Translator, value: Any, path: str, node: dict) -> None:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and set(value) == {"train"}:
        value = value["train"]
    if isinstance(value, str):
        where = " (an AzureML datastore file, downloaded into the stage store)" if value.startswith(
            "azureml:") else ""
        t.note(path, value, t.put("data.train_file", value, path) + where)
    elif isinstance(value, dict) and value.get("type") == "azureml_datastore":
        uri = datastore_uri(t, value, path)
        t.note(path, value, f"{t.put('data.train_file', uri, path)} (an AzureML datastore file, "
                            "downloaded into the stage store with your Azure login)")
    else:
        raise t.error(path, f"not supported: {show(value)}; give one file (a path), or an "
                            "azureml_datastore reference")


def datastore_uri(t: Translator, value: dict, path: str) -> str:
    """azureml://[subscriptions/S/resourcegroups/R/workspaces/W/]datastores/D/paths/P."""
    inner = value.get("config")
    if inner is not None and not isinstance(inner, dict):
        raise t.error(f"{path}.config", f"expected a mapping, got {show(inner)}")
    conf = {**value, **(inner or {})}
    for key in conf:
        if key not in DATASTORE_KEYS:
            raise t.unknown(f"{path}.config.{key}", key, DATASTORE_KEYS)
    store, rel = conf.get("datastore_name"), conf.get("relative_path")
    for key, part in (("datastore_name", store), ("relative_path", rel)):
        if not (isinstance(part, str) and part.strip()):
            raise t.error(f"{path}.config.{key}", f"an azureml_datastore needs {key} as text, got "
                                                  f"{show(part)}")
    client = conf.get("azureml_client") or t.azureml_client
    if not client:  # the azureml worker names the workspace (SLMFLOW_AZUREML_*)
        return f"azureml://datastores/{store}/paths/{rel}"
    where = f"{path}.config.azureml_client" if conf.get("azureml_client") else "azureml_client"
    sub, group, workspace = (workspace_key(t, client, key, where) for key in WORKSPACE_KEYS)
    return (f"azureml://subscriptions/{sub}/resourcegroups/{group}/workspaces/{workspace}/"
            f"datastores/{store}/paths/{rel}")


def workspace_key(t: Translator, client: Any, key: str, where: str) -> str:
    part = t.mapping(client, where).get(key)
    if not (isinstance(part, str) and part.strip() and "/" not in part):
        raise t.error(f"{where}.{key}", f"the workspace of an azureml_datastore needs {key} as "
                                        f"text without '/', got {show(part)}")
    return part


def handle_split(t: Translator, value: Any, path: str, node: dict) -> None:
    if node.get("data_name") in FILE_LOADERS or node.get("data_files") is not None:
        if value not in (None, "train"):
            raise t.error(path, f"not supported: split {given(value)} of a local file; a file is one "
                                "split (train); hold out eval rows with eval_dataset_size or give "
                                "eval_data_config")
        t.note(path, value, "noted: a local file is one split")
    else:
        t.apply(Map("data.hf_split"), value, path, node)


def handle_dataset_type(t: Translator, value: Any, path: str, node: dict) -> None:
    if value not in (None, "corpus"):
        raise t.error(path, f"not supported: dataset_type {given(value)}; slmflow renders each row "
                            "with text_template (corpus)")
    t.note(path, value, "noted: text from text_cols / text_template, as slmflow does")


def handle_text_cols(t: Translator, value: Any, path: str, node: dict) -> None:
    columns = [value] if isinstance(value, str) else value
    if not (is_text_list(columns) and columns and all(c.strip() for c in columns)):
        raise t.error(path, f"expected a column name or a list of them, e.g. [\"phrase\", "
                            f"\"tone\"], got {show(value)}")
    t.note(path, value, t.put("data.text_columns", columns, path))


def handle_text_template(t: Translator, value: Any, path: str, node: dict) -> None:
    from slmflow.textformat import template_fields

    if not isinstance(value, str):
        raise t.error(path, f"expected a template (text with {{column}} placeholders), got "
                            f"{show(value)}")
    try:
        fields = template_fields(value)
    except ValueError as exc:
        raise t.error(path, f"not a valid template: {exc}") from None
    if not fields:
        raise t.error(path, "the template names no column; the last placeholder is the label")
    became = [t.put("data.text_template", value, path), t.put("data.label_column", fields[-1], path)]
    if "text_cols" not in node:
        became.append(t.put("data.text_columns", fields, path))
    t.note(path, value, "; ".join(became) + " (the label is the template's last placeholder: the "
           "model is prompted with the text before it and learns to answer with it)")


def handle_strategy(t: Translator, value: Any, path: str, node: dict) -> None:
    if value in OTHER_STRATEGIES:
        raise t.error(path, f"not supported: {value}; slmflow offers join and line-by-line")
    if not isinstance(value, str) or value not in STRATEGIES:
        raise t.unknown(path, show(value) if not isinstance(value, str) else value,
                        [*STRATEGIES, *OTHER_STRATEGIES], "strategy")
    became = t.put("data.corpus_strategy", STRATEGIES[value], path)
    why = (" (rows joined by EOS and cut into max_seq_len chunks; loss on every token, as Olive)"
           if value == "join" else " (loss on the answer only, finetune.loss_on; Olive counts "
           "the whole text: --set finetune.loss_on=all for that)")
    t.note(path, value, became + why)


def finish_data(t: Translator) -> None:
    """text_cols without a template: Olive joins them with spaces; then the label set."""
    data = t.out.get("data", {})
    if "text_columns" in data and "text_template" not in data:
        cols, origin = data["text_columns"], t.set_by["data.text_columns"]
        template = " ".join("{" + c + "}" for c in cols)
        t.extend(origin, f"{t.put('data.text_template', template, origin)}; "
                         f"{t.put('data.label_column', cols[-1], origin)} (no text_template: Olive "
                         "joins text_cols with spaces; the last column is the label)")
    read_labels(t)


def read_labels(t: Translator) -> None:
    """data.labels: the distinct values of the label column, read from a local data file."""
    from slmflow.dataio import read_rows
    from slmflow.errors import DataError

    data = t.out.get("data", {})
    column, spec = data.get("label_column"), data.get("train_file")
    if not column or not spec:
        return
    origin = t.set_by["data.train_file"]
    default = f"data.labels: slmflow's default {show(DEFAULT_LABELS)}"
    if spec.startswith(("hf:", "azureml:")):
        t.extend(origin, f"{default} (not read from there; set data.labels with --set)")
        return
    problem = path_problem(spec)
    if problem:  # config validation names it, with the key
        t.extend(origin, f"{default} (not read: {problem})")
        return
    try:
        _, rows = read_rows(spec)
    except DataError as exc:
        t.extend(origin, f"{default} (could not read the file: {exc})")
        return
    values = list(dict.fromkeys(str(r[column]).strip() for _, r in rows if column in r))
    if len(values) > MAX_LABELS:
        raise t.error(t.set_by["data.label_column"], f"the label column {column!r} (the template's "
                      f"last placeholder) has {len(values)} distinct values in {spec}: slmflow "
                      "fine-tunes classifiers (a small label set)")
    if not values:  # no such column there: the data check names it, with the file and line
        t.extend(origin, f"{default} (no column {column!r} in the file)")
    elif set(values) == set(DEFAULT_LABELS):
        t.extend(origin, f"{default} (the distinct values of {column!r} there)")
    else:
        t.extend(origin, t.put("data.labels", values, origin)
                 + f" (the distinct values of {column!r} there)")


USER_CODE = Refused("slmflow runs no user code; use text_template")
MAX_LEN = Map("data.max_seq_len", "join: the chunk length; line_by_line: a longer row is an error, "
              "Olive truncates it")
OLIVE_FILLS = Noted("Olive fills it from input_model; slmflow uses the base model's tokenizer")

LOAD_DATASET = Table({
    "type": Special(handle_component_type, "huggingface_dataset only"),
    "data_name": Special(handle_data_name, "json, csv, parquet (with data_files): a local file; "
                         "another name: a Hugging Face dataset → `data.train_file` hf:NAME"),
    "data_files": Special(
        handle_data_files, "a local file → `data.train_file` (its distinct labels → "
        "`data.labels`); an azureml_datastore reference (or an azureml:// file) → `data.train_file` "
        "azureml://[subscriptions/S/resourcegroups/R/workspaces/W/]datastores/D/paths/P "
        "(downloaded into the stage store with your Azure login)"),
    "split": Special(handle_split, "→ `data.hf_split` for a Hugging Face dataset; a local file is "
                     "one split (train)"),
    "subset": Refused("slmflow loads Hugging Face datasets without a subset; save the subset to a "
                      "file"),
    "data_dir": Refused("name the data file with data_files"),
    "col_filters": Refused("filter the rows into a file first", ok=(None, {})),
    "trust_remote_code": Noted("slmflow runs no dataset scripts"),
    "streaming": Refused("slmflow reads the whole data file", ok=(None, False)),
}, wrapper="params")
STRATEGY_DOC = ("join → `data.corpus_strategy` join (rows joined by EOS, cut into max_seq_len "
                "chunks, loss on every token, as Olive); line-by-line → line_by_line (loss on the "
                "answer: finetune.loss_on); random and sliding-window strategies refused")
PRE_PROCESS = Table({
    "type": Special(handle_component_type, "huggingface_pre_process or "
                    "text_generation_huggingface_pre_process"),
    "dataset_type": Special(handle_dataset_type, "corpus (text from text_cols/text_template); "
                            "other dataset types refused"),
    "text_cols": Special(handle_text_cols, "→ `data.text_columns`"),
    "text_template": Special(
        handle_text_template, "→ `data.text_template`; its last placeholder is the label column "
        "(`data.label_column`): the model is prompted with the text before it"),
    "corpus_strategy": Special(handle_strategy, STRATEGY_DOC),
    "strategy": Special(handle_strategy, "Olive 0.13's name for corpus_strategy (same values)"),
    "source_max_len": MAX_LEN,
    "max_seq_len": MAX_LEN,
    "pad_to_max_len": Noted("slmflow pads each batch to its longest row; padding is masked"),
    "use_attention_mask": Noted("slmflow always passes an attention mask that hides padding"),
    "add_special_tokens": Refused("slmflow always adds the tokenizer's special tokens and EOS",
                                  ok=(None, True)),
    "joiner": Noted("slmflow separates joined rows by EOS (and BOS where the tokenizer adds one)"),
    "padding_side": Refused("slmflow pads on the right", ok=(None, "right")),
    "drop_short_sequences": Refused("slmflow keeps every row", ok=(None, False)),
    "max_samples": Refused("use a data file with fewer rows"),
    "stride": Refused("only for join-sliding-window, which slmflow does not offer"),
    "random_seed": Noted("only for Olive's random strategies, which slmflow refuses"),
    "random_retries": Noted("only for Olive's random strategies, which slmflow refuses"),
    "processing_batch_size": Noted("tokenization batching; no effect on the result"),
    "chat_template": Refused("write the chat format into text_template", ok=(None, False)),
    "message_col": Refused("write the chat format into text_template"),
    "text_formatting_func": USER_CODE,
    "user_script": USER_CODE,
    "script_dir": USER_CODE,
    "task": TASK,
    "model_name": OLIVE_FILLS,
    "trust_remote_code": OLIVE_FILLS,
}, wrapper="params")
DATA_CONFIG = Table({
    "name": Noted("the name that train_data_config / eval_data_config refer to"),
    "type": Special(handle_data_type, "HuggingfaceContainer: slmflow reads the same data itself "
                    "(a .json/.jsonl/.csv/.parquet file, or hf:NAME); other containers refused"),
    "load_dataset_config": Section(LOAD_DATASET),
    "pre_process_data_config": Section(PRE_PROCESS),
    "post_process_data_config": Refused("slmflow's post-processing is fixed: the prompt is the "
                                        "template up to the label", ok=(None, {})),
    "dataloader_config": Noted("slmflow batches training rows by finetune.batch_size and evaluates "
                               "one prompt at a time"),
    "user_script": Refused("slmflow runs no user scripts; describe the text with text_template"),
    "script_dir": Refused("slmflow runs no user scripts; describe the text with text_template"),
})
