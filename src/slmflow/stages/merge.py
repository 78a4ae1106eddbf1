"""Stage 4: merge the adapter into a full-precision base and check the merge.

The base is always full precision (merging into a 4-bit model would round the adapter away).
After LoRA it is the original weights, and merged logits are compared with base+adapter on a few
eval prompts. After QLoRA the model that was trained is the 4-bit base with the adapter, so
both full-precision forms are built and compared with *it* on the same prompts: the original
weights (W + BA) and the dequantized 4-bit ones (dequant(W4) + BA); `merge.base_weights` says
which one is written. Each form's merge is checked against its own unmerged model, and the
dequantized form against the trained model as well (it is meant to be the same model): past
`merge.tolerance` the stage fails. The original form's distance to the trained model is the
4-bit rounding the adapter learned around, reported, not judged.
"""

from __future__ import annotations

from typing import Any

from slmflow.artifacts import ArtifactRef
from slmflow.config import MergeConfig
from slmflow.errors import StageCheckError
from slmflow.stage import Stage, Workspace


def _distance(expected: list[Any], got: list[Any]) -> dict[str, float]:
    """Max and mean |logit diff| over every position of the check prompts, and the share of
    positions whose top next token is the same."""
    diffs = [(e - g).abs() for e, g in zip(expected, got)]
    same = [(e.argmax(-1) == g.argmax(-1)).float() for e, g in zip(expected, got)]
    positions = sum(int(d.shape[-2]) for d in diffs)
    return {
        "max_logit_diff": max(float(d.max()) for d in diffs),
        "mean_logit_diff": sum(float(d.mean(-1).sum()) for d in diffs) / positions,
        "top1_agreement": sum(float(s.sum()) for s in same) / positions,
    }


def merge_form(cfg: MergeConfig, folder, adapter: str, batches: list[Any], trust_remote_code: bool,
               trained=None) -> tuple[Any, list[Any], list[Any]]:
    """Load the full-precision base (dequantized from `trained`'s 4-bit weights when given), put
    the adapter on, merge; (merged model, logits unmerged, logits merged)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if trained is not None:
        from slmflow.qlora import copy_dequantized

        if not copy_dequantized(trained.get_base_model(), model):
            raise StageCheckError("merge: the trained model has no 4-bit weights to dequantize")
    model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        unmerged = [model(**b).logits for b in batches]
        merged = model.merge_and_unload().to(getattr(torch, cfg.dtype))
        got = [merged(**b).logits.float() for b in batches]
    return merged, unmerged, got


def build(cfg: MergeConfig, ws: Workspace, base: ArtifactRef, adapter: ArtifactRef,
          data: ArtifactRef, trust_remote_code: bool,
          quantization: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the merged model to `model/` of the stage folder."""
    from slmflow.folders import describe_model, model_dir, read_split
    from slmflow.qlora import resolve_base_weights
    from slmflow.resources import check_resources, estimate_merge

    folder = model_dir(base)
    params = base.meta.get("parameters") or describe_model(folder)["parameters"]
    check_resources("merge", *estimate_merge(params), ws.out)  # before anything is loaded

    from transformers import AutoTokenizer

    chosen = resolve_base_weights(cfg.base_weights, quantization)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [r["text"] for r in read_split(data, "eval")[: cfg.check_prompts]]
    batches = [tokenizer(p, return_tensors="pt") for p in prompts]
    if quantization is None:  # LoRA: the adapter was trained on the original weights
        merged, unmerged, got = merge_form(cfg, folder, adapter.uri, batches, trust_remote_code)
        exact = _distance(unmerged, got)["max_logit_diff"]
        ws.log(f"merge: max |logit diff| merged vs base+adapter = {exact:.3g} ({cfg.dtype})")
        meta = {"max_logit_diff": exact, "dtype": cfg.dtype, "check_prompts": len(prompts),
                "base_weights": chosen}
        _check_exact(exact, cfg, "base+adapter")
    else:
        merged, meta = merge_qlora(cfg, ws, folder, adapter.uri, batches, trust_remote_code,
                                   quantization, chosen)
    merged.save_pretrained(ws.out / "model")
    tokenizer.save_pretrained(ws.out / "model")
    del merged
    return meta


def merge_qlora(cfg: MergeConfig, ws: Workspace, folder, adapter: str, batches: list[Any],
                trust_remote_code: bool, quantization: dict[str, Any],
                chosen: str) -> tuple[Any, dict[str, Any]]:
    """Both forms measured against the trained model; the chosen one returned (built last, so
    one full-precision model is held at a time)."""
    import torch

    from slmflow.qlora import load_trained

    trained = load_trained(folder, adapter, quantization, "cpu", trust_remote_code)
    with torch.no_grad():
        reference = [trained(**b).logits.float() for b in batches]
    forms: dict[str, dict[str, Any]] = {}
    kept = None
    for form in sorted(("original", "dequantized"), key=lambda f: f == chosen):
        merged, unmerged, got = merge_form(cfg, folder, adapter, batches, trust_remote_code,
                                           trained if form == "dequantized" else None)
        forms[form] = {"merge_exactness": _distance(unmerged, got)["max_logit_diff"],
                       "vs_trained": _distance(reference, got)}
        if form == chosen:
            kept = merged
        del merged, unmerged, got
    del trained
    for form, f in forms.items():
        ws.log(f"merge: {form} base + adapter vs the trained model (4-bit base + adapter): max "
               f"|logit diff| {f['vs_trained']['max_logit_diff']:.3g}, mean "
               f"{f['vs_trained']['mean_logit_diff']:.3g}, same top token "
               f"{f['vs_trained']['top1_agreement']:.1%}" + (" (written)" if form == chosen else ""))
    exact = forms[chosen]["merge_exactness"]
    _check_exact(exact, cfg, f"{chosen} base+adapter")
    distance = forms["dequantized"]["vs_trained"]["max_logit_diff"]
    if chosen == "dequantized" and distance > cfg.tolerance:
        raise StageCheckError(
            f"merge: the dequantized base + adapter differs from the trained model (4-bit base + "
            f"adapter) by {distance:.3g} > merge.tolerance={cfg.tolerance}: the dequantization "
            "does not reproduce the 4-bit weights; merge into merge.base_weights=original or "
            "raise merge.tolerance")
    return kept, {
        "max_logit_diff": exact, "dtype": cfg.dtype, "check_prompts": len(batches),
        "base_weights": chosen, "reference": "trained (4-bit base + adapter)",
        "max_logit_diff_vs_trained": forms[chosen]["vs_trained"]["max_logit_diff"],
        "forms": forms,
    }


def _check_exact(diff: float, cfg: MergeConfig, against: str) -> None:
    if diff > cfg.tolerance:
        raise StageCheckError(
            f"merge: merged logits differ from {against} by {diff:.3g} > merge.tolerance="
            f"{cfg.tolerance}; merge in float32 (merge.dtype) or raise merge.tolerance"
        )


def key_config(cfg: MergeConfig, quantization: dict[str, Any] | None = None,
               **_: Any) -> dict[str, Any]:
    """LoRA merges keep the keys they had before base_weights existed (it is always original);
    a QLoRA merge is keyed by the resolved base and the 4-bit settings of the trained model."""
    from slmflow.qlora import resolve_base_weights

    keyed = cfg.model_dump(mode="json", exclude={"base_weights"})
    if quantization is None:
        return keyed
    return keyed | {"base_weights": resolve_base_weights(cfg.base_weights, quantization),
                    "quantization": quantization}


STAGE = Stage(name="merge", kind="merged_model", version=1, inputs=("base", "adapter", "data"),
              options={"trust_remote_code": False, "quantization": None}, key_config=key_config,
              build=build)
