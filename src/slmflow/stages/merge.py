"""Stage 4: merge the adapter into the full-precision base and check the merge.

The base is always loaded in full precision, also after QLoRA (merging into a 4-bit base would
bake its quantization error into the weights). Merged logits are compared with base+adapter on a
few eval prompts; the largest difference is recorded and the stage fails past the tolerance.
"""

from __future__ import annotations

from typing import Any

from slmflow.artifacts import ArtifactRef
from slmflow.config import MergeConfig
from slmflow.errors import StageCheckError
from slmflow.stage import Stage, Workspace


def build(cfg: MergeConfig, ws: Workspace, base: ArtifactRef, adapter: ArtifactRef,
          data: ArtifactRef, trust_remote_code: bool) -> dict[str, Any]:
    """Write the merged model to `model/` of the stage folder."""
    from slmflow.folders import describe_model, model_dir, read_split
    from slmflow.resources import check_resources, estimate_merge

    folder = model_dir(base)
    params = base.meta.get("parameters") or describe_model(folder)["parameters"]
    check_resources("merge", *estimate_merge(params), ws.out)  # before anything is loaded

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    model = PeftModel.from_pretrained(model, adapter.uri)
    model.eval()
    prompts = [r["text"] for r in read_split(data, "eval")[: cfg.check_prompts]]
    batches = [tokenizer(p, return_tensors="pt") for p in prompts]
    with torch.no_grad():
        expected = [model(**b).logits for b in batches]
        merged = model.merge_and_unload()
        merged = merged.to(getattr(torch, cfg.dtype))
        got = [merged(**b).logits.float() for b in batches]
    diff = max(float((e - g).abs().max()) for e, g in zip(expected, got))
    ws.log(f"merge: max |logit diff| merged vs base+adapter = {diff:.3g} ({cfg.dtype})")
    if diff > cfg.tolerance:
        raise StageCheckError(
            f"merge: merged logits differ from base+adapter by {diff:.3g} > merge.tolerance="
            f"{cfg.tolerance}; merge in float32 (merge.dtype) or raise merge.tolerance"
        )
    merged.save_pretrained(ws.out / "model")
    tokenizer.save_pretrained(ws.out / "model")
    return {"max_logit_diff": diff, "dtype": cfg.dtype, "check_prompts": len(prompts)}


STAGE = Stage(name="merge", kind="merged_model", version=1, inputs=("base", "adapter", "data"),
              options={"trust_remote_code": False}, build=build)
