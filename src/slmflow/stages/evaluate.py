"""Stage 6: evaluate a model on the held-out split by what it answers.

Each prompt is continued greedily (PyTorch for the base and merged models, onnxruntime-genai for
the exported one; the same prompt token ids for both) and the answer is read as the label it
starts with. Records accuracy, macro-F1, the confusion matrix, per-example latency (p50/p95),
generated tokens per second and the model's size on disk; `predictions.jsonl` keeps every answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmflow.artifacts import ArtifactRef, dir_size, run_stage, stage_key
from slmflow.config import EvaluateConfig

VERSION = 1
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


Generator = Callable[[list[int], int], list[int]]


def torch_generator(folder: Path, trust_remote_code: bool = False) -> tuple[Generator, Any]:
    """Greedy continuation with a transformers model (fp32, CPU or CUDA)."""
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

    def generate(ids: list[int], max_new: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        new = out[0, len(ids):].tolist()
        return new[: new.index(eos)] if eos in new else new

    return generate, tokenizer


def onnx_generator(folder: Path) -> tuple[Generator, Any]:
    """Greedy continuation with onnxruntime-genai, and its tokenizer."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    eos_cfg = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    eos = set(eos_cfg if isinstance(eos_cfg, list) else [eos_cfg])

    def generate(ids: list[int], max_new: int) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + max_new)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        new: list[int] = []
        while not gen.is_done() and len(new) < max_new:
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            if token in eos:
                break
            new.append(token)
        return new

    return generate, og.Tokenizer(model)


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
        from transformers import AutoTokenizer

        from slmflow.stages.base_model import model_dir
        from slmflow.stages.prepare_data import read_split

        rows = read_split(data, split)[: cfg.limit]
        if model.kind == "onnx_model":
            folder = model.path
            generate, _ = onnx_generator(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            folder = model_dir(model)
            generate, tokenizer = torch_generator(folder, trust_remote_code)
        longest = max(len(tokenizer(lab, add_special_tokens=False)["input_ids"]) for lab in labels)
        max_new = min(cfg.max_new_tokens, longest + 1)
        generate(tokenizer(rows[0]["prompt"])["input_ids"], max_new)  # warm-up, not timed
        gold, pred, latencies, n_tokens = [], [], [], 0
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                ids = tokenizer(row["prompt"])["input_ids"]
                start = time.perf_counter()
                new = generate(ids, max_new)
                latencies.append(time.perf_counter() - start)
                n_tokens += len(new)
                answer = tokenizer.decode(new, skip_special_tokens=True)
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
            tokens_per_second=round(n_tokens / max(sum(latencies), 1e-9), 1),
            size_bytes=dir_size(folder),
        )
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log(f"evaluate {model.kind}: accuracy {metrics['accuracy']:.3f}, "
            f"macro-F1 {metrics['macro_f1']:.3f}, p50 {metrics['latency_ms_p50']} ms")
        return metrics

    return run_stage(KIND, key, store, [model, data], build, log=log)
