"""Which MatMuls int4 hurts most: each one quantized alone, judged by the label KL it causes.

For every weight the model builder turns into one ONNX MatMul (q, k and v together when the
builder packs them into `qkv_proj`), the merged PyTorch model answers calibration prompts (rows of
the training split) with that weight alone rounded to int4 — round-to-nearest, symmetric, in
blocks of `block_size` along the input dimension, as the builder's default recipe does — and
the mean KL(merged ‖ that model) over the label set at the answer position is its sensitivity
(`slmflow.fidelity`: each label scored by its tokens, teacher-forced). The export keeps the most
sensitive MatMuls at int8 within a size budget (`export.sensitivity`).

Run as (prints the ranking of a merged model folder on a prepared dataset's training rows):
    python -m slmflow.sensitivity MERGED_MODEL_DIR DATASET_DIR [--rows 16] [--block-size 32]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

# Hugging Face module names → the ONNX MatMul the model builder makes of them.
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


def onnx_matmul_names(module: str) -> list[tuple[str, int, int]]:
    """The builder's MatMul node(s) for the Linear `module`: (name, part, parts), the node holding
    output rows part/parts of the weight (Phi-3's packed gate_up_proj becomes two MatMuls,
    gate then up; q, k and v go into one qkv_proj). [] when it is no MatMul the builder makes."""
    if module == "lm_head":
        return [("/lm_head/MatMul", 0, 1)]
    found = _LAYER.match(module)
    if not found:
        return []
    layer, block, proj = found.groups()
    if block == "self_attn":
        proj = "qkv_proj" if proj in ("q_proj", "k_proj", "v_proj") else proj
        return [(f"/model/layers.{layer}/attn/{proj}/MatMul", 0, 1)]
    if proj == "gate_up_proj":
        return [(f"/model/layers.{layer}/mlp/gate_proj/MatMul", 0, 2),
                (f"/model/layers.{layer}/mlp/up_proj/MatMul", 1, 2)]
    return [(f"/model/layers.{layer}/mlp/{proj}/MatMul", 0, 1)]


def matmul_groups(model: Any) -> dict[str, list[tuple[Any, slice]]]:
    """ONNX MatMul name → the (Linear, rows of its weight) it holds."""
    import torch

    groups: dict[str, list[tuple[Any, slice]]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        rows = module.weight.shape[0]
        for node, part, parts in onnx_matmul_names(name):
            share = rows // parts
            groups.setdefault(node, []).append((module, slice(part * share, (part + 1) * share)))
    return groups


def int4_round_trip(weight: Any, block_size: int = 32) -> Any:
    """`weight` ([out, in]) rounded to symmetric int4 in blocks along `in`, as floats again."""
    import torch

    out_features, in_features = weight.shape
    pad = (-in_features) % block_size
    w = torch.nn.functional.pad(weight.float(), (0, pad)).view(out_features, -1, block_size)
    scale = w.abs().amax(dim=-1, keepdim=True) / 7.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w / scale), -8, 7) * scale
    return q.view(out_features, -1)[:, :in_features].to(weight.dtype)


def rank(backend: Any, prompts: list[list[int]], labels: list[str],
         block_size: int = 32) -> list[dict[str, Any]]:
    """Every MatMul of `backend` (a PyTorch `slmflow.generate.Backend`), the most sensitive
    first: {"node", "label_kl", "parameters"}."""
    import torch

    from slmflow.fidelity import kl_divergence
    from slmflow.generate import label_probabilities

    model = backend.module
    reference = label_probabilities(backend, prompts, labels)
    ranking = []
    for node, parts in matmul_groups(model).items():
        kept = [(module, module.weight) for module, _ in parts]
        for module, rows in parts:  # a new Parameter: a tied weight (embeddings) stays as it is
            rounded = module.weight.data.clone()
            rounded[rows] = int4_round_trip(rounded[rows], block_size)
            module.weight = torch.nn.Parameter(rounded, requires_grad=False)
        try:
            probs = label_probabilities(backend, prompts, labels)
        finally:
            for module, weight in kept:
                module.weight = weight
        kls = [kl_divergence(r, p) for r, p in zip(reference, probs, strict=True)]
        ranking.append({"node": node, "label_kl": sum(kls) / len(kls),
                        "parameters": sum(w[rows].numel() for (_, w), (_, rows) in zip(kept, parts))})
    ranking.sort(key=lambda r: (-r["label_kl"], r["node"]))
    return ranking


def within_budget(ranking: list[dict[str, Any]], budget: float, total_parameters: int) -> list[str]:
    """The most sensitive MatMuls that int8 can keep while the extra bytes (half a byte more per
    weight than int4) stay within `budget` × the int4 weights' bytes (half a byte each)."""
    allowed, used, kept = budget * total_parameters * 0.5, 0.0, []
    for row in ranking:
        extra = row["parameters"] * 0.5
        if row["label_kl"] > 0 and used + extra <= allowed:
            kept.append(row["node"])
            used += extra
    return kept


def calibration_rows(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """`n` rows taken from each label in turn (in the split's order): balanced calibration."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    queues = [list(reversed(v)) for _, v in sorted(by_label.items())]
    picked: list[dict[str, Any]] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop())
    return picked


def main(argv: list[str] | None = None) -> int:
    import argparse

    from slmflow.artifacts import read_verified
    from slmflow.folders import read_split
    from slmflow.generate import torch_backend

    parser = argparse.ArgumentParser(prog="python -m slmflow.sensitivity")
    parser.add_argument("model", type=Path)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args(argv)
    data = read_verified(args.dataset)
    if data is None:
        parser.error(f"{args.dataset} is not a verified prepared dataset folder")
    train = read_split(data, "train")
    rows, labels = calibration_rows(train, args.rows), sorted({row["label"] for row in train})
    backend = torch_backend(args.model)
    prompts = [backend.tokenizer(row["prompt"])["input_ids"] for row in rows]
    for row in rank(backend, prompts, labels, args.block_size):
        print(f"{row['label_kl']:.6f}  {row['parameters']:>10}  {row['node']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
