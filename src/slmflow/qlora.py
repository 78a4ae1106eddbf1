"""The model a QLoRA fine-tune trained, and the two full-precision bases its adapter can be merged into.

QLoRA trains the adapter against the 4-bit base: the trained model computes dequant(W4)·x + BA·x.
Merging into the original weights gives W + BA, a model nobody trained; merging into the
dequantized 4-bit weights gives dequant(W4) + BA, the trained model itself in full precision.
`merge.base_weights` picks one (the merge stage measures both against the trained model), and the
evaluation scores the trained model as its own row ("trained"), loaded as it was trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

BaseWeights = Literal["original", "dequantized"]

# What merge.base_weights=auto merges a QLoRA adapter into, measured on the default model and
# data (README, "QLoRA"): the dequantized base is the trained model itself (0.903, max |logit
# diff| 8e-5) but its int4 export fell to 0.833 (nf4-rounded weights rounded again onto int4's
# grid); the original weights gave 0.889 merged and 0.889 int4, within the gate. The shipped
# model is the int4 one.
QLORA_MERGE_DEFAULT: BaseWeights = "original"


def quantization_settings(cfg: Any) -> dict[str, Any] | None:
    """The bitsandbytes settings a QLoRA fine-tune loaded its base with (None for LoRA): what
    loading the trained model again needs, and what its evaluation and merge are keyed by."""
    if cfg.method != "qlora":
        return None
    return {"quant_type": cfg.quant_type, "double_quant": cfg.double_quant,
            "compute_dtype": cfg.compute_dtype}


def resolve_base_weights(setting: str, quantization: dict[str, Any] | None) -> BaseWeights:
    """merge.base_weights with auto resolved: LoRA always merges into the original weights."""
    if quantization is None:
        return "original"
    return QLORA_MERGE_DEFAULT if setting == "auto" else setting  # type: ignore[return-value]


def bnb_config(quantization: dict[str, Any]):
    """The transformers BitsAndBytesConfig of these settings (4-bit base, as in training)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization["quant_type"],
        bnb_4bit_use_double_quant=quantization["double_quant"],
        bnb_4bit_compute_dtype=getattr(torch, quantization["compute_dtype"]),
    )


def load_4bit(folder: Path, quantization: dict[str, Any], device: str,
              trust_remote_code: bool = False):
    """The base model in 4 bits, exactly as the fine-tune loaded it."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code,
        quantization_config=bnb_config(quantization), device_map={"": device},
    )
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # In eval mode on a CPU with AVX512-BF16, bitsandbytes 0.50 repacks the 4-bit weights
            # and multiplies in bf16 (outputs off by ~4e-3 on a tiny Phi-3 layer): not the fp32
            # dequantize-and-matmul the fine-tune computed, and a packed weight dequantize_4bit
            # no longer reads. Training mode never takes that path.
            module.support_avx512bf16_for_cpu = False
    return model


def load_trained(folder: Path, adapter: Path, quantization: dict[str, Any], device: str,
                 trust_remote_code: bool = False):
    """The model as trained: the 4-bit base with the adapter on top, in eval mode."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_4bit(folder, quantization, device, trust_remote_code),
                                      str(adapter))
    model.eval()
    return model


def copy_dequantized(quantized, model) -> int:
    """Overwrite each weight of `model` that is 4-bit in `quantized` (the same architecture,
    possibly with adapters injected) with its dequantized value; the number of weights replaced.

    Modules bitsandbytes left in full precision (lm_head, embeddings, norms) are the original
    weights in both, so only the 4-bit linears change.
    """
    import bitsandbytes as bnb
    import torch

    replaced = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if name.endswith(".base_layer"):  # reached through its peft wrapper, named as in `model`
                continue
            layer = getattr(module, "base_layer", module)
            if not isinstance(layer, bnb.nn.Linear4bit):
                continue
            weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            target = model.get_submodule(name).weight
            target.copy_(weight.to(target.dtype).reshape(target.shape))
            replaced += 1
    return replaced
