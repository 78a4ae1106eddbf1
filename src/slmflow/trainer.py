"""The transformers Trainer as the fine-tune uses it.

- Batches padded on the right, labels masked where there is no target (`collate_padded`).
- Logits only where a token has a target (`labelled_logits_only`): with the loss on the answer,
  most positions of a row have none.
- A length-grouped batch order that depends on (seed, epoch) only, so that a resumed run, in one
  process or several, trains on the batches an uninterrupted one does.
- Checkpoints read back only when complete (`last_checkpoint`), and every logged loss kept
  (`loss_history`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmflow.stage import Progress


def collate_padded(pad_id: int):
    import torch

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(b["input_ids"]) for b in batch)
        ids, labels, mask = [], [], []
        for b in batch:
            pad = width - len(b["input_ids"])
            ids.append(b["input_ids"] + [pad_id] * pad)
            labels.append(b["labels"] + [-100] * pad)
            mask.append([1] * len(b["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }

    return collate


def labelled_logits_only(labels) -> dict[str, Any]:
    """Model kwargs that project to the vocabulary only where a token has a target.

    With the loss on the answer, ~3 of ~30 positions of a row have a target; the others' logits
    (49k floats each for SmolLM2) were computed and thrown away, forward and backward. The loss is
    the same sum over the same target tokens (`shift_labels` are the targets of the kept positions).
    """
    import torch

    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    keep = targets != -100
    return {"logits_to_keep": keep, "shift_labels": targets[keep]}


def supports_labelled_logits(model) -> bool:
    """Whether the (peft-wrapped) causal LM takes `logits_to_keep` and the causal-LM loss."""
    import inspect

    from transformers.loss.loss_utils import ForCausalLMLoss

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return (
        "logits_to_keep" in params
        and any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
        and getattr(base, "loss_function", None) is ForCausalLMLoss
    )


def _checkpoint_step(folder: Path) -> int | None:
    """The step of a complete checkpoint, else None.

    The Trainer writes trainer_state.json last, so a folder without a readable one (a kill while
    saving, or a truncated file) is skipped and the one before it is used.
    """
    try:
        step = int(folder.name.split("-")[1])
        state = json.loads((folder / "trainer_state.json").read_text())
    except (IndexError, ValueError, OSError):
        return None
    return step if state.get("global_step") == step else None


def last_checkpoint(folder: Path) -> Path | None:
    ckpts = [p for p in folder.glob("checkpoint-*") if _checkpoint_step(p) is not None]
    return max(ckpts, key=lambda p: int(p.name.split("-")[1]), default=None)


def trainer_class(group_by_length: bool, seed: int):
    """The Trainer, with a length-grouped batch order that a resumed run reproduces.

    The Trainer's own LengthGroupedSampler draws each epoch's order from the global torch RNG.
    A run resumed in epoch k starts that epoch's draw from a fresh seed, so it trained on
    another order than the uninterrupted run (the adapters differed by ~2e-2). Here the order
    of epoch k depends on (seed, k) alone, as accelerate's seedable sampler does for `random`.
    """
    import torch
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochSeededLengthSampler(LengthGroupedSampler):
        def __init__(self, batch_size: int, lengths: list[int]):
            super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:  # called by the Trainer before each epoch
            self.epoch = epoch

        def __iter__(self):
            self.generator.manual_seed(seed * 1_000_003 + self.epoch)
            return super().__iter__()

    class SlmflowTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not hasattr(self, "_labelled_logits"):
                self._labelled_logits = supports_labelled_logits(self.model)
            if self._labelled_logits and not return_outputs and "labels" in inputs:
                inputs = {**inputs, **labelled_logits_only(inputs["labels"])}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            if not group_by_length:
                return super()._get_train_sampler(dataset)
            return EpochSeededLengthSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                [len(r["input_ids"]) for r in dataset],
            )

        def get_train_dataloader(self):
            loader = super().get_train_dataloader()
            # accelerate's set_epoch looks for the sampler at most two wrappers down; a resumed
            # epoch of a distributed run adds a third (SkipBatchSampler around the shard), and
            # that epoch then replayed epoch 0's order. Expose the sampler one wrapper up.
            shard = getattr(loader, "batch_sampler", None)
            inner = getattr(shard, "batch_sampler", None)
            if shard is not None and not hasattr(shard, "sampler") and hasattr(inner, "sampler"):
                shard.sampler = inner.sampler
            return loader

    return SlmflowTrainer


def loss_history(progress: Progress | None):
    """A Trainer callback that keeps every logged loss (`.history`) and reports progress."""
    from transformers import TrainerCallback

    class LossHistory(TrainerCallback):
        def __init__(self) -> None:
            self.history: list[dict[str, float]] = []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.history.append({"step": state.global_step, "loss": float(logs["loss"]),
                                     "learning_rate": float(logs.get("learning_rate", 0.0))})

        def on_step_end(self, args, state, control, **kw):
            if progress:
                progress(state.global_step, state.max_steps, self.history[-1] if self.history else {})

    return LossHistory()
