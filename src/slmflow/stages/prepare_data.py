"""Stage 2: load and check the data, render the template, split deterministically, tokenize.

Writes `train.jsonl` and `eval.jsonl` (one row each: the source columns, `label`, `prompt`,
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
    examples: list[dict[str, Any]], cfg: DataConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A stratified split: eval_split of each label, chosen by a seeded shuffle (deterministic)."""
    rng = random.Random(cfg.seed)
    by_label: dict[str, list[dict[str, Any]]] = {}
    for ex in examples:
        by_label.setdefault(ex[cfg.label_column], []).append(ex)
    train, held = [], []
    for label in cfg.labels:
        group = sorted(by_label.get(label, []), key=lambda ex: ex["_line"])
        rng.shuffle(group)
        n_eval = round(len(group) * cfg.eval_split)
        if len(group) >= 2:
            n_eval = min(max(n_eval, 1), len(group) - 1)
        held.extend(group[:n_eval])
        train.extend(group[n_eval:])
    rng.shuffle(train)
    held.sort(key=lambda ex: ex["_line"])
    return train, held


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
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The checked training rows and held-out rows: a stratified split, or the eval file's."""
    examples = load_examples(train_source.uri, cfg)
    if eval_source is None:
        train, held = split_examples(examples, cfg)
    else:
        train, held = examples, load_examples(eval_source.uri, cfg)
    if not train or not held:
        raise DataError(
            f"{train_source.uri}: {len(examples)} rows leave nothing to "
            f"{'train on' if not train else 'evaluate'}; add rows or change data.eval_split"
        )
    return train, held


def build(cfg: DataConfig, ws: Workspace, base: ArtifactRef, train_source: ArtifactRef,
          eval_source: ArtifactRef | None, loss_on: str) -> dict[str, Any]:
    """Check, render, split and tokenize the data with the base model's tokenizer."""
    from transformers import AutoTokenizer

    from slmflow.folders import model_dir

    train, held = split_sources(cfg, train_source, eval_source)
    tokenizer = AutoTokenizer.from_pretrained(model_dir(base))
    stats: dict[str, Any] = {}
    for name, rows in (("train", train), ("eval", held)):
        where = train_source.uri if name == "train" or eval_source is None else eval_source.uri
        if name == "train" and cfg.corpus_strategy == "join":
            tokenized = join_chunks(rows, tokenizer, cfg, _context_length(model_dir(base)))
        else:
            try:
                tokenized = [tokenize_example(ex, tokenizer, cfg, loss_on) for ex in rows]
            except DataError as exc:
                raise DataError(f"{where}:{exc}") from None
        with open(ws.out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in tokenized)
        lengths = [len(r["input_ids"]) for r in tokenized]
        stats[name] = {
            "rows": len(tokenized),
            "labels": dict(Counter(r[cfg.label_column] for r in rows)),
            "tokens": sum(lengths),
            "max_len": max(lengths),
        }
    joined = ""
    if cfg.corpus_strategy == "join":
        stats["train"]["joined_rows"] = len(train)
        joined = f" (chunks of <= {stats['train']['max_len']} tokens joined from {len(train)} rows)"
    (ws.out / "stats.json").write_text(json.dumps(stats, indent=2))
    ws.log(f"data: {stats['train']['rows']} train{joined} / {stats['eval']['rows']} eval rows")
    return stats


STAGE = Stage(
    name="prepare_data",
    kind="dataset",
    version=2,  # 2: corpus_strategy join
    inputs=("base", "train_source", "eval_source"),
    optional=("eval_source",),
    options={"loss_on": "answer"},
    key_config=lambda cfg, loss_on: {"data": cfg, "loss_on": loss_on},
    build=build,
)
