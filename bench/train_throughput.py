"""Benchmark: tokens per second of the fine-tune stage vs a minimal hand-written PEFT loop.

Both train the same LoRA adapter (the stage's own `load_for_training`, same seed) on the same
model, the same batches in the same order (the stage's length-grouped order of each epoch) and
the same number of steps, with the same optimizer settings (AdamW, linear schedule, gradient
clipping). Tokens are the real (non-padding) tokens of the batches trained on; the time is the
training loop (the stage's `train_seconds`: Trainer, loop and checkpoints; the hand loop's steps).
Both run in this process, one after the other (the stage first).

Run as (after a default run, e.g. `slmflow run --no-prefect`, for its base model and data):
    .venv/bin/python -m bench.train_throughput [--run runs/default] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, PeakRss, load_average, table, write_result


def stage_batches(lengths: list[int], batch_size: int, seed: int, steps: int) -> list[list[int]]:
    """The batches the stage trains on: each epoch's length-grouped order, seeded by (seed, epoch)."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < steps:
        gen = torch.Generator()
        gen.manual_seed(seed * 1_000_003 + epoch)
        order = get_length_grouped_indices(lengths, batch_size, generator=gen)
        batches += [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        epoch += 1
    return batches[:steps]


def hand_loop(cfg, folder: Path, rows: list[dict], batches: list[list[int]]) -> dict:
    """The minimal loop: forward, loss.backward, clip, AdamW step, schedule step."""
    import torch
    from transformers import AutoTokenizer, get_scheduler

    from slmflow.stages.finetune import load_for_training
    from slmflow.trainer import collate_padded

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(cfg.seed)
    model = load_for_training(cfg, folder, "cpu")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, cfg.adam_beta2),
                            eps=1e-8, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps,
                          num_training_steps=len(batches))
    collate = collate_padded(pad_id)
    load_seconds = time.perf_counter() - t0
    losses = []
    start = time.perf_counter()
    for batch in batches:
        inputs = collate([rows[i] for i in batch])
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    return {"train_seconds": round(seconds, 2), "load_seconds": round(load_seconds, 2),
            "wall_seconds": round(time.perf_counter() - t0, 2), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="runs/default", help="a finished run's output_dir")
    parser.add_argument("--steps", type=int, default=None, help="default: the run's max_steps")
    args = parser.parse_args()

    from slmflow.artifacts import ArtifactRef
    from slmflow.config import FinetuneConfig
    from slmflow.folders import model_dir, read_split
    from slmflow.stage import run_stage
    from slmflow.stages import STAGES
    from slmflow.store import Store

    run = Path(args.run) if Path(args.run).is_absolute() else REPO / args.run
    report = json.loads((run / "report.json").read_text())
    stages = report["stages"]

    def ref(stage: str, kind: str) -> ArtifactRef:
        uri = stages[stage]["uri"]
        meta = json.loads((Path(uri) / "slmflow-artifact.json").read_text()).get("meta", {})
        return ArtifactRef(kind=kind, uri=uri, sha256=stages[stage]["sha256"],
                           key=stages[stage]["key"], meta=meta)

    base, data = ref("base_model", "base_model"), ref("prepare_data", "dataset")
    cfg = FinetuneConfig(**report["config"]["finetune"])
    if args.steps:
        cfg = cfg.model_copy(update={"max_steps": args.steps})
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in read_split(data, "train")]
    lengths = [len(r["input_ids"]) for r in rows]
    if not cfg.group_by_length or cfg.gradient_accumulation_steps != 1 or not cfg.max_steps:
        sys.exit("this benchmark mirrors group_by_length, no accumulation and max_steps only")
    batches = stage_batches(lengths, cfg.batch_size, cfg.seed, cfg.max_steps)
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)

    before = load_average()
    with tempfile.TemporaryDirectory(prefix="slmflow-bench-train-") as store, PeakRss() as mem:
        t0 = time.perf_counter()
        adapter = run_stage(STAGES["finetune"], cfg, Store.at(store), base=base, data=data,
                            log=lambda m: None)
        stage_wall = time.perf_counter() - t0
        stage_peak = mem.peak_mb
        stage_log = json.loads((adapter.path / "train_log.json").read_text())
    mid = load_average()
    with PeakRss() as mem:
        hand = hand_loop(cfg, model_dir(base), rows, batches)
        hand_peak = mem.peak_mb
    after = load_average()

    stage_seconds = adapter.meta["train_seconds"]
    results = {
        "steps": cfg.max_steps, "batch_size": cfg.batch_size, "real_tokens": real,
        "padded_tokens": padded, "padding_share": round(1 - real / padded, 4),
        "stage": {"train_seconds": stage_seconds, "wall_seconds": round(stage_wall, 2),
                  "tokens_per_second": round(real / stage_seconds, 1),
                  "final_loss": stage_log[-1]["loss"], "peak_rss_mb": stage_peak,
                  "load_average_after": mid},
        "hand_loop": {**{k: v for k, v in hand.items() if k != "losses"},
                      "tokens_per_second": round(real / hand["train_seconds"], 1),
                      "final_loss": hand["losses"][-1], "peak_rss_mb": hand_peak,
                      "load_average_after": after},
        "load_average_before": before,
    }
    ratio = results["stage"]["tokens_per_second"] / results["hand_loop"]["tokens_per_second"]
    results["stage_over_hand_loop"] = round(ratio, 3)
    print(f"{cfg.max_steps} steps of {cfg.batch_size}: {real} real tokens, {padded} with padding "
          f"({results['padding_share']:.1%} padding); load average {before} → {mid} → {after}")
    print(table(["", "train s", "tokens/s", "wall s", "final loss", "peak RSS MB"], [
        ["finetune stage (Trainer)", stage_seconds, results["stage"]["tokens_per_second"],
         round(stage_wall, 1), round(stage_log[-1]["loss"], 4), stage_peak],
        ["hand-written PEFT loop", hand["train_seconds"], results["hand_loop"]["tokens_per_second"],
         hand["wall_seconds"], round(hand["losses"][-1], 4), hand_peak],
    ]))
    print(f"stage / hand loop tokens per second: {ratio:.3f} (goal >= 0.95)")
    write_result("train_throughput", results)


if __name__ == "__main__":
    main()
