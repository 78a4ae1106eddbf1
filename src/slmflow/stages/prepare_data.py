"""Stage 2: load and check the data, render the template, split deterministically, tokenize.

Writes `train.jsonl`, `eval.jsonl` and, with `data.validation_split`, `validation.jsonl` (one row each: the source columns, `label`, `prompt`,
`answer`, `input_ids`, `labels`) and `stats.json`. With `data.corpus_strategy: join` (Olive's) the
training rows are joined and cut into chunks instead (`chunk`, `input_ids`, `labels`).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from slmflow.artifacts import ArtifactRef
from slmflow.config import DataConfig
from slmflow.dataio import load_examples
from slmflow.errors import DataError
from slmflow.stage import Stage, Workspace
from slmflow.textformat import render_example


def split_examples(
    examples: list[dict[str, Any]], cfg: DataConfig, held_out: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """A stratified split (train, eval, validation): eval_split and validation_split of each
    label, chosen by a seeded shuffle (deterministic). `held_out=False` (an eval file is given):
    no eval rows, validation still carved from these. With validation_split 0 the train and eval
    rows are exactly those of the two-way split before validation existed."""
    rng = random.Random(cfg.seed)
    by_label: dict[str, list[dict[str, Any]]] = {}
    for ex in examples:
        by_label.setdefault(ex[cfg.label_column], []).append(ex)
    train, held, validation = [], [], []
    for label in cfg.labels:
        group = sorted(by_label.get(label, []), key=lambda ex: ex["_line"])
        rng.shuffle(group)
        n_eval = round(len(group) * cfg.eval_split) if held_out else 0
        if held_out and len(group) >= 2:
            n_eval = min(max(n_eval, 1), len(group) - 1)
        n_val = round(len(group) * cfg.validation_split)
        if cfg.validation_split and len(group) - n_eval >= 2:
            n_val = min(max(n_val, 1), len(group) - n_eval - 1)
        else:
            n_val = 0
        held.extend(group[:n_eval])
        validation.extend(group[n_eval:n_eval + n_val])
        train.extend(group[n_eval + n_val:])
    rng.shuffle(train)
    held.sort(key=lambda ex: ex["_line"])
    validation.sort(key=lambda ex: ex["_line"])
    return train, held, validation


def tokenize_example(ex: dict[str, Any], tokenizer, cfg: DataConfig, loss_on: str) -> dict[str, Any]:
    """Prompt and answer are tokenized apart, as at inference the model continues the prompt."""
    rendered = render_example(ex, cfg.text_template, cfg.label_column)
    prompt_ids = tokenizer(rendered["prompt"], add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(rendered["answer"], add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids + [tokenizer.eos_token_id]
    input_ids = prompt_ids + answer_ids
    if len(input_ids) > cfg.max_seq_len:
        raise DataError(
            f"line {ex['_line']}: {len(input_ids)} tokens is longer than data.max_seq_len="
            f"{cfg.max_seq_len}; shorten the row or raise data.max_seq_len"
        )
    labels = ([-100] * len(prompt_ids) if loss_on == "answer" else list(prompt_ids)) + answer_ids
    return {
        **{k: v for k, v in ex.items() if k != "_line"},
        "line": ex["_line"],
        "label": ex[cfg.label_column],
        **rendered,
        "input_ids": input_ids,
        "labels": labels,
    }


def join_chunks(
    rows: list[dict[str, Any]], tokenizer, cfg: DataConfig, context: int | None
) -> list[dict[str, Any]]:
    """Olive's `corpus_strategy: join`: every rendered row (with the tokenizer's special tokens,
    ended by EOS) concatenated, then cut into chunks of max_seq_len tokens, loss on every token.

    Unlike Olive, the last shorter chunk is kept (Olive drops it: a small dataset would give no
    chunk at all); a chunk of one token (no next-token target) is dropped. `context` caps the chunk
    length at the model's context length.
    """
    size = min(cfg.max_seq_len, context) if context else cfg.max_seq_len
    ids: list[int] = []
    for ex in rows:
        text = render_example(ex, cfg.text_template, cfg.label_column)["text"]
        ids += tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    return [
        {"chunk": n, "input_ids": c, "labels": list(c)} for n, c in enumerate(chunks) if len(c) > 1
    ]


def _context_length(folder: Path) -> int | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("max_position_embeddings")


def split_sources(cfg: DataConfig, train_source: ArtifactRef, eval_source: ArtifactRef | None,
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The checked training, held-out and validation rows: a stratified split of the training
    file (held-out rows from the eval file when there is one)."""
    examples = load_examples(train_source.uri, cfg)
    if eval_source is None or cfg.validation_split:
        train, held, validation = split_examples(examples, cfg, held_out=eval_source is None)
    else:  # the file's own order, as before validation existed (same rows, same key)
        train, held, validation = examples, [], []
    if eval_source is not None:
        held = load_examples(eval_source.uri, cfg)
    if not train or not held:
        raise DataError(
            f"{train_source.uri}: {len(examples)} rows leave nothing to "
            f"{'train on' if not train else 'evaluate'}; add rows or change data.eval_split"
        )
    if cfg.validation_split and not validation:
        raise DataError(
            f"{train_source.uri}: {len(examples)} rows leave no validation rows; add rows or set "
            "data.validation_split=0"
        )
    return train, held, validation


def build(cfg: DataConfig, ws: Workspace, base: ArtifactRef, train_source: ArtifactRef,
          eval_source: ArtifactRef | None, loss_on: str) -> dict[str, Any]:
    """Check, render, split and tokenize the data with the base model's tokenizer."""
    from transformers import AutoTokenizer

    from slmflow.folders import model_dir

    train, held, validation = split_sources(cfg, train_source, eval_source)
    tokenizer = AutoTokenizer.from_pretrained(model_dir(base))
    stats: dict[str, Any] = {}
    splits = [("train", train), ("eval", held)] + ([("validation", validation)] if validation else [])
    for name, rows in splits:
        where = train_source.uri if name != "eval" or eval_source is None else eval_source.uri
        if name == "train" and cfg.corpus_strategy == "join":
            tokenized = iter(join_chunks(rows, tokenizer, cfg, _context_length(model_dir(base))))
        else:  # one row at a time, written as it is made: no second copy of the split
            tokenized = (tokenize_example(ex, tokenizer, cfg, loss_on) for ex in rows)
        count, tokens, longest = 0, 0, 0
        with open(ws.out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            try:
                for row in tokenized:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    count, tokens = count + 1, tokens + len(row["input_ids"])
                    longest = max(longest, len(row["input_ids"]))
            except DataError as exc:
                raise DataError(f"{where}:{exc}") from None
        stats[name] = {
            "rows": count,
            "labels": dict(Counter(r[cfg.label_column] for r in rows)),
            "tokens": tokens,
            "max_len": longest,
        }
    joined = ""
    if cfg.corpus_strategy == "join":
        stats["train"]["joined_rows"] = len(train)
        joined = f" (chunks of <= {stats['train']['max_len']} tokens joined from {len(train)} rows)"
    (ws.out / "stats.json").write_text(json.dumps(stats, indent=2))
    val = f" / {stats['validation']['rows']} validation" if validation else ""
    ws.log(f"data: {stats['train']['rows']} train{joined} / {stats['eval']['rows']} eval{val} rows")
    return stats


def key_config(cfg: DataConfig, loss_on: str) -> dict[str, Any]:
    # validation_split counts only when used, so data prepared before it existed keeps its key
    dumped = cfg.model_dump(mode="json")
    if not cfg.validation_split:
        dumped.pop("validation_split")
    return {"data": dumped, "loss_on": loss_on}


STAGE = Stage(
    name="prepare_data",
    kind="dataset",
    version=2,  # 2: corpus_strategy join
    inputs=("base", "train_source", "eval_source"),
    optional=("eval_source",),
    options={"loss_on": "answer"},
    key_config=key_config,
    build=build,
)
