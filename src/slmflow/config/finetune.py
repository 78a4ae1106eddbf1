"""The fine-tune section (`finetune.*`, `finetune.distributed.*`) and the merge (`merge.*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from slmflow.config.base import PathSpec, _Config


class DistributedConfig(_Config):
    """Data-parallel fine-tuning with torch.distributed (torchrun, AzureML's PyTorch distribution).

    torchrun on one machine; across machines, an AzureML job of the azureml pool with
    instance_count or processes_per_instance above 1.
    """

    processes_per_node: Literal["auto"] | int = Field(
        "auto",
        title="Processes per node",
        description="auto: one per visible GPU (1 on CPU), or the processes per instance of an "
        "AzureML distributed job. More than 1 starts torchrun; each process trains on its share "
        "of every global batch (batch_size × gradient_accumulation_steps × world size).",
    )
    nodes: Literal["auto"] | int = Field(
        "auto",
        title="Nodes",
        description="auto: 1, or the instance count of an AzureML distributed job (every node "
        "runs processes_per_node processes). Above 1 only inside such a job.",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", title="Backend", description="auto: nccl on CUDA, gloo on CPU."
    )
    timeout_seconds: int = Field(
        600,
        ge=10,
        le=86400,
        title="Timeout (s)",
        description="Rendezvous and collective timeout: a rank that dies or hangs fails the "
        "stage after this long, never a hang.",
    )

    @field_validator("processes_per_node", "nodes")
    @classmethod
    def _positive(cls, value: int | str, info) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"finetune.distributed.{info.field_name} must be 'auto' or at least 1, "
                             f"got {value}")
        return value


class FinetuneConfig(_Config):
    """LoRA or QLoRA fine-tuning of the base model (or an adapter trained elsewhere)."""

    adapter_path: PathSpec | None = Field(
        None,
        title="Given adapter",
        description="A PEFT LoRA adapter trained elsewhere (a folder with adapter_config.json "
        "and adapter_model.safetensors; local, or pkg:MODULE/FOLDER), on this base model: "
        "nothing is trained, the adapter is merged, exported (merged or separate) and evaluated "
        "as a trained one would be, keyed by its files' content. Its own adapter_config.json "
        "says r, alpha and target modules (finetune.r, alpha, target_modules and the training "
        "settings are unused); method qlora says it was trained on the 4-bit base (the trained "
        "model is evaluated that way, merge.base_weights dequantized is allowed). Olive's "
        "input_model.adapter_path. null: train one.",
    )
    method: Literal["lora", "qlora"] = Field(
        "lora",
        title="Method",
        description="lora: fp32 base; qlora: 4-bit base with bitsandbytes (works on CPU too).",
    )
    r: int = Field(16, ge=1, le=1024, title="LoRA rank", description="Higher: more capacity and memory.")
    alpha: float = Field(32, gt=0, title="LoRA alpha", description="Scale is alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, title="LoRA dropout", description="On the adapter input.")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        title="Target modules",
        description="Module names to adapt (Phi-3: qkv_proj, o_proj; Llama/SmolLM2: q_proj ...).",
        min_length=1,
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", title="4-bit type", description="QLoRA only.")
    double_quant: bool = Field(True, title="Double quant", description="QLoRA only.")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        title="Compute dtype",
        description="QLoRA compute dtype. float32 on CPUs without bf16 (bf16 was 22x slower here).",
    )
    learning_rate: float = Field(5e-4, gt=0, le=1.0, title="Learning rate", description="Peak LR.")
    batch_size: int = Field(
        8, ge=1, title="Batch size",
        description="Per step, per process: the global batch is batch_size × "
        "gradient_accumulation_steps × world size (finetune.distributed).")
    gradient_accumulation_steps: int = Field(
        1, ge=1, title="Gradient accumulation", description="Batches summed per optimizer step."
    )
    max_steps: int | None = Field(
        100, ge=1, title="Max steps", description="Optimizer steps; overrides epochs when set."
    )
    epochs: float = Field(1.0, gt=0, title="Epochs", description="Used when max_steps is null.")
    warmup_steps: int = Field(0, ge=0, title="Warmup steps", description="Linear warmup.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", title="LR schedule", description="After warmup."
    )
    weight_decay: float = Field(0.0, ge=0.0, title="Weight decay", description="AdamW decay.")
    max_grad_norm: float = Field(1.0, gt=0, title="Max grad norm", description="Gradient clipping.")
    adam_beta2: float = Field(0.999, gt=0, lt=1, title="Adam beta2", description="AdamW second-moment decay.")
    checkpoint_every: int = Field(
        20, ge=1, title="Checkpoint every", description="Steps between resumable checkpoints."
    )
    loss_on: Literal["answer", "all"] = Field(
        "answer",
        title="Loss on",
        description="answer: only the label tokens (and what follows it in the template) count; "
        "all: the whole text, as Olive does.",
    )
    group_by_length: bool = Field(
        True, title="Group by length", description="Batch rows of similar length (less padding)."
    )
    gradient_checkpointing: bool = Field(
        False, title="Gradient checkpointing", description="Recompute activations: less memory, slower."
    )
    seed: int = Field(0, title="Training seed", description="Adapter init and batch order.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", title="Device", description="auto: CUDA when available, else CPU."
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        title="Distributed",
        description="Data parallelism over processes and nodes (torch.distributed). The global "
        "batch is batch_size × gradient_accumulation_steps × world size.",
    )


    @model_validator(mode="after")
    def _nothing_to_distribute(self) -> FinetuneConfig:
        spread = {k: v for k, v in (("processes_per_node", self.distributed.processes_per_node),
                                    ("nodes", self.distributed.nodes)) if v not in ("auto", 1)}
        if self.adapter_path is not None and spread:
            key, value = next(iter(spread.items()))
            raise ValueError(f"finetune.distributed.{key}={value}: with finetune.adapter_path "
                             "nothing is trained, so there is nothing to distribute; set it to "
                             "auto, or finetune.adapter_path to null to train an adapter")
        return self


class MergeConfig(_Config):
    """Merge the adapter into a full-precision base (never into a 4-bit one)."""

    base_weights: Literal["auto", "original", "dequantized"] = Field(
        "auto",
        title="Merge into",
        description="The full-precision weights the adapter is merged into. original: the base "
        "model's own weights (W + BA). dequantized (QLoRA only): the 4-bit weights the adapter "
        "was trained against, dequantized (dequant(W4) + BA: the trained model itself). auto: "
        "original, for LoRA and QLoRA: on the default QLoRA run the dequantized base matched the "
        "trained model (0.903) but its int4 export fell to 0.833, the original one gave 0.889 "
        "merged and int4 (README, QLoRA). The merge reports both forms' distance to the trained "
        "model either way.",
    )

    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        title="Merged dtype",
        description="float32 keeps merged logits within 1e-5 of base+adapter; bf16 drifted 0.19.",
    )
    tolerance: float = Field(
        1e-3, gt=0, title="Logit tolerance",
        description="Max |logit diff| of the merged model vs the same base with the adapter "
        "unmerged, and (QLoRA merged into the dequantized base) vs the trained model.",
    )
    check_prompts: int = Field(4, ge=1, le=64, title="Check prompts", description="Rows checked.")
