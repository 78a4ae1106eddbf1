"""Stage 3: teach a LoRA or QLoRA adapter with peft and the transformers Trainer.

QLoRA loads the base in 4 bits with bitsandbytes (nf4/fp4, double quant; it runs on CPU too) and
trains the adapter in `compute_dtype`. Checkpoints go to the stage's work folder every
`checkpoint_every` steps, so a killed run resumes from the last one. Writes the adapter
(`adapter_config.json`, `adapter_model.safetensors`) and `train_log.json` (the loss curve).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmflow.artifacts import ArtifactRef
from slmflow.config import FinetuneConfig
from slmflow.distributed import World, resolve_world, run_ranks
from slmflow.errors import ConfigError
from slmflow.stage import Progress, Stage, Workspace
from slmflow.trainer import collate_padded, last_checkpoint, loss_history, trainer_class


def check_target_modules(cfg: FinetuneConfig, base: ArtifactRef, **_: Any) -> None:
    """Refuse target modules the base model does not have, listing the ones it does."""
    have = base.meta.get("linear_modules") or []
    missing = [m for m in cfg.target_modules if m not in have]
    if have and missing:
        raise ConfigError(
            f"finetune.target_modules: {missing} not found in {base.meta.get('architecture')}; "
            f"its linear modules are {have}"
        )


def pick_device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("finetune.device=cuda but no CUDA device is visible; use auto or cpu")
    return "cuda" if choice == "auto" and torch.cuda.is_available() else (
        "cpu" if choice == "auto" else choice
    )


def load_for_training(cfg: FinetuneConfig, folder: Path, device: str):
    """The base model, in fp32 (LoRA) or 4-bit (QLoRA), wrapped with a fresh adapter."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32, "use_safetensors": True}
    if cfg.method == "qlora":  # the merge and the "trained" evaluation load it the same way
        from slmflow.qlora import bnb_config, quantization_settings

        kwargs["quantization_config"] = bnb_config(quantization_settings(cfg))
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing
        )
    else:
        model.to(device)
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def training_arguments(cfg: FinetuneConfig, checkpoints: Path, device: str, world: World | None):
    """The Trainer's arguments: the config's optimizer and schedule, a checkpoint every
    `checkpoint_every` steps, the loss logged every step, nothing reported elsewhere.

    With several processes, the data loader yields the global batch (batch_size × world size)
    and accelerate splits it (`split_batches`): the length-grouped, seeded batch order is the
    one a single process with that batch size sees, and each rank trains on its share.
    """
    from transformers import TrainingArguments

    size = world.size if world else 1
    distributed = {} if size == 1 else {
        "accelerator_config": {"split_batches": True},
        "ddp_backend": world.backend,
        "ddp_timeout": world.timeout,
        "ddp_find_unused_parameters": False,  # LoRA: every trainable weight gets a gradient
    }
    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=cfg.batch_size * size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_steps=cfg.max_steps if cfg.max_steps else -1,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        adam_beta2=cfg.adam_beta2,
        activation_checkpointing=cfg.gradient_checkpointing and cfg.method == "lora",
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.checkpoint_every,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=device == "cpu",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        **distributed,
    )


def resume_point(checkpoints: Path, history: list[dict[str, float]], log,
                 agree: Callable[[int], bool] | None = None) -> Path | None:
    """The last complete checkpoint of an interrupted attempt, its loss history put back first.

    `agree(step)` (distributed) tells whether every rank sees that checkpoint; if one does not
    (no shared folder across nodes), the fine-tune starts over.
    """
    resume = last_checkpoint(checkpoints)
    step = int(resume.name.split("-")[1]) if resume else 0
    if agree is not None and not agree(step):
        log("finetune: not every rank sees the checkpoint; starting over")
        return None
    if resume is not None:
        log(f"finetune: resuming from {resume.name} (step {step})")
        prior = json.loads((resume / "trainer_state.json").read_text())
        history.extend(
            {"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate", 0.0)}
            for h in prior.get("log_history", []) if "loss" in h
        )
    return resume


def training_metrics(cfg: FinetuneConfig, steps: int, log_rows: list[dict[str, float]],
                     train_loss: float, tokens: int, rows: int, resumed_from: int,
                     seconds: float, world_size: int = 1) -> dict[str, Any]:
    """What the adapter's manifest says about its training."""
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    epochs_seen = steps * global_batch / max(1, rows)
    ran = (steps - resumed_from) / max(steps, 1)  # share of the steps this attempt ran
    if resumed_from and len(log_rows) == steps:
        # The Trainer averages only the steps it ran after resuming; the mean of the whole
        # history (one logged loss a step) is what an uninterrupted run reports.
        train_loss = sum(h["loss"] for h in log_rows) / steps
    return {
        "method": cfg.method,
        "steps": steps,
        "world_size": world_size,
        "global_batch": global_batch,
        "resumed_from_step": resumed_from,
        "train_rows": rows,
        "final_loss": log_rows[-1]["loss"] if log_rows else None,
        "train_seconds": round(seconds, 2),
        "train_loss": train_loss,
        "tokens_per_second": round(tokens * epochs_seen * ran / max(seconds, 1e-9), 1),
    }


@dataclass(frozen=True)
class Rank:
    """This process's place in a distributed fine-tune."""

    world: World
    rank: int
    local_rank: int
    agree: Callable[[int], bool]  # do all ranks see the same value?


def train(cfg: FinetuneConfig, base: ArtifactRef, data: ArtifactRef, out: Path, checkpoints: Path,
          log, progress: Progress | None = None, rank: Rank | None = None) -> dict[str, Any] | None:
    """Train the adapter (one process, or this rank's part); rank 0 writes it and its loss
    history to `out` and returns the metrics, the other ranks return None."""
    import torch
    from transformers import AutoTokenizer

    from slmflow.folders import model_dir, read_split

    device = pick_device(cfg.device)
    if device == "cuda" and rank is not None:
        device = f"cuda:{rank.local_rank}"
        torch.cuda.set_device(rank.local_rank)
    folder = model_dir(base)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in read_split(data, "train")]
    torch.manual_seed(cfg.seed)
    model = load_for_training(cfg, folder, device)
    losses = loss_history(progress)
    started = time.perf_counter()
    trainer = trainer_class(cfg.group_by_length, cfg.seed)(
        model=model,
        args=training_arguments(cfg, checkpoints, device, rank.world if rank else None),
        train_dataset=rows,  # a plain list: no `datasets` fingerprinting of our functions
        data_collator=collate_padded(pad_id),
        callbacks=[losses],
    )
    resume = resume_point(checkpoints, losses.history, log, rank.agree if rank else None)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started
    if rank is not None and rank.rank != 0:
        return None
    gpu = {"peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20)} if on_gpu else {}
    model.save_pretrained(out)
    sort_target_modules(out / "adapter_config.json")
    log_rows = sorted({h["step"]: h for h in losses.history}.values(), key=lambda h: h["step"])
    (out / "train_log.json").write_text(json.dumps(log_rows, indent=1))
    tokens = sum(len(r["input_ids"]) for r in rows)
    resumed_from = int(resume.name.split("-")[1]) if resume else 0
    return {"device": device.split(":")[0], **gpu} | training_metrics(
        cfg, trainer.state.global_step, log_rows, float(result.training_loss), tokens, len(rows),
        resumed_from, seconds, rank.world.size if rank else 1)


def sort_target_modules(config: Path) -> None:
    """peft writes target_modules from a set, in an order that changes with each process's string
    hashing: sorted, the same training gives the same bytes (and content hash) in any process."""
    data = json.loads(config.read_text())
    if isinstance(data.get("target_modules"), list):
        config.write_text(json.dumps({**data, "target_modules": sorted(data["target_modules"])}, indent=2))


def world_of(cfg: FinetuneConfig) -> World:
    """The processes this fine-tune runs on (checked: refusals name the fix)."""
    return resolve_world(cfg.distributed, pick_device(cfg.device))


def build(cfg: FinetuneConfig, ws: Workspace, base: ArtifactRef, data: ArtifactRef) -> dict[str, Any]:
    """Train the adapter here, or start the ranks and collect what rank 0 wrote."""
    world = world_of(cfg)
    if world.size == 1:
        return train(cfg, base, data, ws.out, ws.work / "checkpoints", ws.log, ws.progress)
    ticket = ws.work / "ticket.json"
    ticket.write_text(json.dumps({
        "cfg": cfg.model_dump(mode="json"), "base": base.model_dump(mode="json"),
        "data": data.model_dump(mode="json"), "out": str(ws.out), "work": str(ws.work),
        "store": ws.store.model_dump(mode="json") if ws.store else None,
        "world": {"nodes": world.nodes, "per_node": world.per_node, "backend": world.backend,
                  "timeout": world.timeout},
    }))
    return run_ranks(world, ticket, ws.work, ws.log, ws.progress)


def key_config(cfg: FinetuneConfig) -> dict[str, Any]:
    """The config as the adapter's key sees it: how many processes share the global batch
    changes the adapter; how they were started does not. (One process keeps the keys of
    adapters trained before distributed fine-tuning existed.)"""
    # adapter_path is None here (a given adapter is the given_adapter stage's); left out, the
    # keys of adapters trained before it existed stay as they were
    keyed = cfg.model_dump(mode="json", exclude={"distributed", "adapter_path"})
    size = world_of(cfg).size
    return keyed if size == 1 else keyed | {"world_size": size}


def check(cfg: FinetuneConfig, base: ArtifactRef, **_: Any) -> None:
    check_target_modules(cfg, base)
    world_of(cfg)


STAGE = Stage(
    name="finetune",
    kind="adapter",
    version=2,  # 2: the batch order of group_by_length depends on (seed, epoch) only
    inputs=("base", "data"),
    check=check,
    key_config=key_config,
    build=build,
)
