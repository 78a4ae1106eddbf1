"""Stage 6: evaluate a model on the held-out split by what it answers.

Each prompt is continued greedily (PyTorch for the base and merged models, onnxruntime-genai for
the exported one; the same prompt token ids for both) and the answer is read as the label it
starts with. Prompts of the same token length are generated together (up to BATCH_SIZE, never
padded), which gives each row the answer it gets alone. Records accuracy, macro-F1, the confusion
matrix, latency per example (p50/p95: the time it waited for its batch), examples and generated
tokens per second, and the model's size on disk; `predictions.jsonl` keeps every answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmflow.artifacts import ArtifactRef, dir_size, run_stage, stage_key
from slmflow.config import EvaluateConfig
from slmflow.stages import release_memory

VERSION = 2  # 2: equal-length prompts generated in batches; latency is the batch's
OTHER = "(other)"


def parse_answer(text: str, labels: list[str]) -> str:
    """The label an answer starts with (exact case first, then any case), else OTHER."""
    text = text.strip()
    by_length = sorted(labels, key=len, reverse=True)
    for label in by_length:
        if text.startswith(label):
            return label
    for label in by_length:
        if text.lower().startswith(label.lower()):
            return label
    return OTHER


def score(gold: list[str], pred: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over the label set, and the confusion matrix (rows gold, cols pred)."""
    cols = labels + [OTHER]
    matrix = {g: {p: 0 for p in cols} for g in labels}
    for g, p in zip(gold, pred):
        matrix[g][p] += 1
    f1s = []
    for label in labels:
        tp = matrix[label][label]
        fp = sum(matrix[g][label] for g in labels if g != label)
        fn = sum(matrix[label][p] for p in cols if p != label)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    correct = sum(g == p for g, p in zip(gold, pred))
    return {
        "accuracy": correct / len(gold),
        "macro_f1": sum(f1s) / len(f1s),
        "confusion": matrix,
        "n": len(gold),
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


# Prompts of the same token length are generated together: no padding, so each row's answer is
# the one it gets alone (checked row by row on the default's base, merged and int4 models). On
# the default's 144 rows, 2 cores: PyTorch 7.1 -> 18.3 examples/s, onnxruntime-genai 17.7 -> 26.3
# (bench/bench_inference.py); 16 was the fastest of 4, 8, 16, 32.
BATCH_SIZE = 16

Generator = Callable[[list[list[int]], int], list[list[int]]]


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for n, t in enumerate(tokens):
        if t in eos:
            return tokens[:n]
    return tokens


def length_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Row indices grouped by exact length (so no batch needs padding), at most `size` a batch."""
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    return [rows[i:i + size] for _, rows in sorted(by_length.items()) for i in range(0, len(rows), size)]


def torch_generator(folder: Path, trust_remote_code: bool = False) -> tuple[Generator, Any]:
    """Greedy continuation of equal-length prompts with a transformers model (fp32, CPU or CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    ).to(device)
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def generate(batch: list[list[int]], max_new: int) -> list[list[int]]:
        ids = torch.tensor(batch, device=device)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        return [_until_eos(row[ids.shape[1]:].tolist(), {eos}) for row in out]

    return generate, tokenizer


def onnx_generator(folder: Path) -> tuple[Generator, Any]:
    """Greedy continuation of equal-length prompts with onnxruntime-genai, and its tokenizer."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    eos_cfg = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    eos = set(eos_cfg if isinstance(eos_cfg, list) else [eos_cfg])

    def generate(batch: list[list[int]], max_new: int) -> list[list[int]]:
        params = og.GeneratorParams(model)
        params.set_search_options(
            do_sample=False, max_length=len(batch[0]) + max_new, batch_size=len(batch)
        )
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(batch, dtype=np.int32))
        new: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        for _ in range(max_new):
            if gen.is_done() or all(done):
                break
            gen.generate_next_token()
            for i, token in enumerate(gen.get_next_tokens().tolist()):
                if done[i] or token in eos:
                    done[i] = True
                else:
                    new[i].append(int(token))
        return new

    return generate, og.Tokenizer(model)


def load_generator(model: ArtifactRef, trust_remote_code: bool = False) -> tuple[Generator, Any, Path]:
    """The generator, an HF tokenizer (the same prompt ids for every backend) and the model folder."""
    from transformers import AutoTokenizer

    from slmflow.stages.base_model import model_dir

    if model.kind == "onnx_model":
        generate, _ = onnx_generator(model.path)
        return generate, AutoTokenizer.from_pretrained(model.path), model.path
    folder = model_dir(model)
    generate, tokenizer = torch_generator(folder, trust_remote_code)
    return generate, tokenizer, folder


def generate_answers(
    generate: Generator, prompts: list[list[int]], max_new: int, batch_size: int = BATCH_SIZE
) -> tuple[list[list[int]], list[float]]:
    """The new tokens of every prompt (in order) and the seconds each one waited for its batch."""
    new: list[list[int]] = [[] for _ in prompts]
    waited = [0.0] * len(prompts)
    for batch in length_batches([len(p) for p in prompts], batch_size):
        start = time.perf_counter()
        out = generate([prompts[i] for i in batch], max_new)
        seconds = time.perf_counter() - start
        for i, tokens in zip(batch, out):
            new[i], waited[i] = tokens, seconds
    return new, waited


KIND = "evaluation"


def evaluation_key(
    cfg: EvaluateConfig,
    store: Path,
    model: ArtifactRef,
    data: ArtifactRef,
    labels: list[str],
    split: str = "eval",
) -> str:
    slice_ = {"evaluate": cfg, "labels": labels, "split": split}
    return stage_key(KIND, VERSION, slice_, [model, data], store)


def evaluate_model(
    cfg: EvaluateConfig,
    store: Path,
    model: ArtifactRef,
    data: ArtifactRef,
    labels: list[str],
    split: str = "eval",
    trust_remote_code: bool = False,
    log=print,
) -> ArtifactRef:
    """Evaluate one model (base_model, merged_model or onnx_model) on a prepared split."""
    key = evaluation_key(cfg, store, model, data, labels, split)

    def build(out: Path, work: Path) -> dict[str, Any]:
        from slmflow.stages.prepare_data import read_split

        rows = read_split(data, split)[: cfg.limit]
        generate, tokenizer, folder = load_generator(model, trust_remote_code)
        longest = max(len(tokenizer(lab, add_special_tokens=False)["input_ids"]) for lab in labels)
        max_new = min(cfg.max_new_tokens, longest + 1)
        prompts = [tokenizer(row["prompt"])["input_ids"] for row in rows]
        generate([prompts[0]], max_new)  # warm-up, not timed
        started = time.perf_counter()
        new, latencies = generate_answers(generate, prompts, max_new)
        seconds = time.perf_counter() - started
        gold, pred, n_tokens = [], [], 0
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for row, tokens in zip(rows, new):
                n_tokens += len(tokens)
                answer = tokenizer.decode(tokens, skip_special_tokens=True)
                gold.append(row["label"])
                pred.append(parse_answer(answer, labels))
                f.write(json.dumps({"line": row["line"], "gold": row["label"], "pred": pred[-1],
                                    "answer": answer}, ensure_ascii=False) + "\n")
        metrics = score(gold, pred, labels)
        metrics.update(
            model_kind=model.kind,
            split=split,
            latency_ms_p50=round(1000 * _percentile(latencies, 0.5), 2),
            latency_ms_p95=round(1000 * _percentile(latencies, 0.95), 2),
            tokens_per_second=round(n_tokens / max(seconds, 1e-9), 1),
            examples_per_second=round(len(rows) / max(seconds, 1e-9), 1),
            batch_size=BATCH_SIZE,
            size_bytes=dir_size(folder),
        )
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log(f"evaluate {model.kind}: accuracy {metrics['accuracy']:.3f}, "
            f"macro-F1 {metrics['macro_f1']:.3f}, p50 {metrics['latency_ms_p50']} ms")
        return metrics

    ref = run_stage(KIND, key, store, [model, data], build, log=log)
    release_memory()
    return ref
