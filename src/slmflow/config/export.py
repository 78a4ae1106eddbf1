"""The export section (`export.*`, `export.search.*`) and the evaluation (`evaluate.*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from slmflow.config.base import PathSpec, _Config

RecipeName = Literal[
    "int4_rtn_b128", "int4_rtn_b64", "int4_rtn_b32", "int4_rtn_b16", "int4_default",
    "int4_hqq", "int4_gptq", "int4_k_quant", "int4_k_quant_last", "int4_sensitive",
    "int4_k_quant_mixed", "int8", "fp16",
]
ALL_RECIPES: tuple[str, ...] = RecipeName.__args__  # from the smallest expected model up
# Tried only when asked: GPTQ runs the model over its calibration rows once per layer (minutes
# on SmolLM2 on a CPU); onnxruntime 1.32's HQQ lost the fine-tune of SmolLM2 here (it answered
# like the base model, accuracy 0 on both sets; bench.recipes).
DEFAULT_CANDIDATES: tuple[str, ...] = tuple(r for r in ALL_RECIPES if r not in ("int4_gptq", "int4_hqq"))
# The recipes export.adapters=separate cannot build, and why: its base keeps the LoRA branches
# fp32 through the model builder and is shared by every fine-tune. Those of slmflow.recipes.RECIPES
# not quantized by the builder or with a sensitivity budget (tests/unit/test_recipes checks it).
SEPARATE_REFUSALS: dict[str, str] = {
    "int4_hqq": "onnxruntime's HQQ quantizer makes every MatMul int4, the LoRA branches too",
    "int4_gptq": "onnxruntime's GPTQ quantizer makes every MatMul int4, the LoRA branches too",
    "int4_sensitive": "its int8 MatMuls are ranked on the merged fine-tune, so the base would not "
                      "be shared by other fine-tunes",
}


class RecipeSearchConfig(_Config):
    """What `export.recipe: auto` tries, and how it picks (see slmflow.recipes)."""

    candidates: list[RecipeName] = Field(
        default_factory=lambda: list(DEFAULT_CANDIDATES),
        min_length=1,
        title="Candidates",
        description="Recipes to export and evaluate: int4 RTN by block size (b16-b128), int4_default "
        "(the builder's own: RTN, block 32), int4_hqq / int4_gptq (onnxruntime's quantizer on the "
        "builder's fp32 graph; GPTQ calibrates on training prompts; neither is in the default "
        "list: GPTQ is slow, HQQ lost SmolLM2's fine-tune here), int4 k_quant / k_quant_last / k_quant_mixed, int4_sensitive (RTN with the "
        "MatMuls int4 hurts most at int8, within a 25% size budget), int8, fp16.",
    )
    objective: Literal["smallest", "fastest"] = Field(
        "smallest",
        title="Objective",
        description="Among the candidates within the quality gate (and the fidelity floors), keep "
        "the smallest on disk or the fastest (p50 latency on the gate's set).",
    )
    min_agreement: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        title="Min agreement",
        description="Fidelity floor: a candidate must give the merged model's answer on at least "
        "this share of the gate set's rows (e.g. 0.99). null: no floor.",
    )
    max_label_kl: float | None = Field(
        None,
        ge=0.0,
        title="Max label KL",
        description="Fidelity floor: a candidate's mean KL(merged ‖ candidate) over the label set "
        "on the gate set's rows must be at most this (nats, e.g. 0.05). null: no floor.",
    )
    max_parallel: int = Field(
        1,
        ge=1,
        le=8,
        title="Parallel candidates",
        description="Candidates exported and evaluated at once (lowered to what memory allows).",
    )

    @field_validator("candidates")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        twice = sorted({v for v in value if value.count(v) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed twice; name each recipe once")
        return value


class SensitivityConfig(_Config):
    """Sensitivity-guided mixed precision (see slmflow.sensitivity)."""

    int8_budget: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        title="int8 size budget",
        description="Keep the MatMuls whose int4 rounding alone moves the label KL most at int8, "
        "while the extra weight bytes stay within this share of the int4 weights' (0.25: at most "
        "25% more). 0: off.",
    )
    rows: int = Field(
        16, ge=1, le=1024, title="Calibration rows",
        description="Training rows (balanced over labels) the ranking is measured on.",
    )


class ExportConfig(_Config):
    """ONNX export with onnxruntime-genai's model builder."""

    recipe: Literal["manual", "auto"] = Field(
        "manual",
        title="Recipe",
        description="manual: export with precision/algo_config/block_size below; auto: export and "
        "evaluate every candidate of `search`, keep the smallest (or fastest) within the gate "
        "(with adapters: separate, each candidate is a base build + this fine-tune's adapter file).",
    )
    search: RecipeSearchConfig = Field(
        default_factory=RecipeSearchConfig, title="Recipe search", description="Used by recipe: auto."
    )

    precision: Literal["int4", "int8", "fp16", "fp32"] = Field(
        "int4", title="Precision", description="Weight precision of the exported model."
    )
    execution_provider: Literal["cpu", "cuda", "dml"] = Field(
        "cpu", title="Execution provider", description="Target runtime of the exported model."
    )
    algo_config: Literal[
        "default", "rtn", "k_quant", "rtn_last", "k_quant_last", "k_quant_mixed", "k_quant_linear"
    ] = Field(
        "k_quant",
        title="Quantization algorithm",
        description="int4/int8 recipe. Chosen on the default run's eval split (docs/recipes.md): "
        "k_quant kept SmolLM2's accuracy (0.910 vs merged 0.903) at 1.02× the size of the "
        "builder's default RTN, which lost 6.3 points; k_quant_mixed (int8 in some layers) was "
        "27% larger and no closer to the merged model.",
    )
    block_size: Literal[16, 32, 64, 128, 256] | None = Field(
        None, title="Block size", description="Quantization block size (builder default 32)."
    )
    accuracy_level: Literal[1, 2, 3, 4] | None = Field(
        None,
        title="Accuracy level",
        description="MatMulNBits compute: 1 fp32, 2 fp16, 3 bf16, 4 int8 (builder default 4 on CPU).",
    )
    matmul_mixed_precision: str | None = Field(
        None,
        title="Mixed precision",
        description="e.g. last_matmul:int8,mixed_layers:int8 (overrides the algo_config alias).",
    )
    extra_options: dict[str, str | bool | int | float] = Field(
        {},
        title="Extra builder options",
        description="Passed as --extra_options KEY=VALUE (e.g. is_symmetric: false).",
    )
    quantizer: Literal["builder", "hqq", "gptq"] = Field(
        "builder",
        title="Quantizer",
        description="builder: the model builder quantizes (algo_config). hqq / gptq: the builder "
        "writes the fp32 graph and onnxruntime's HQQ (no data) or GPTQ (calibrated on training "
        "prompts) quantizer makes its MatMuls int4 in blocks of block_size (default 32); int4 "
        "on cpu only.",
    )
    calibration_rows: int = Field(
        32, ge=1, le=4096, title="GPTQ calibration rows",
        description="quantizer gptq: training rows (balanced over labels) used as calibration data.",
    )
    sensitivity: SensitivityConfig = Field(
        default_factory=SensitivityConfig, title="Sensitivity-guided int8",
        description="int4 only, quantizer builder.",
    )
    quantize_workers: int | None = Field(
        None, ge=1, le=256, title="k-quant threads",
        description="Threads for the builder's CPU k-quant (algo_config k_quant*): slices of "
        "blocks quantized at once, the same bytes for any count. null: the cores this process "
        "may use, lowered so each thread's temporaries (~40 bytes a weight value, 65536 blocks "
        "a slice at most) fit in half the free memory. Not part of the stage key.",
    )
    adapters: Literal["merged", "separate"] = Field(
        "merged",
        title="Adapters",
        description="merged: the LoRA adapter is merged into the weights and the whole model "
        "exported (one model per fine-tune). separate: one base build per (base model, recipe, "
        "LoRA target modules and rank), shared by every fine-tune of that base, with fp32 LoRA "
        "branches over the int4 base, and one .onnx_adapter file per fine-tune, switched at run "
        "time with onnxruntime-genai's Adapters API (Olive's multi-LoRA). quantizer builder, no "
        "sensitivity budget; with recipe: auto the candidates are searched in this form "
        "(int4_hqq, int4_gptq and int4_sensitive cannot be built: left out of the default list, "
        "refused when named).",
    )

    @model_validator(mode="after")
    def _quantizer_fits(self) -> ExportConfig:
        if self.quantizer != "builder":
            if self.precision != "int4" or self.execution_provider != "cpu":
                raise ValueError(f"export.quantizer={self.quantizer} makes int4 models for cpu; set "
                                 "export.precision=int4 and export.execution_provider=cpu, or "
                                 "export.quantizer=builder")
            if self.matmul_mixed_precision or self.sensitivity.int8_budget:
                raise ValueError(f"export.quantizer={self.quantizer} quantizes every MatMul alike; "
                                 "drop export.matmul_mixed_precision and "
                                 "export.sensitivity.int8_budget, or use export.quantizer=builder")
        if self.adapters == "separate":
            if self.quantizer != "builder" or self.sensitivity.int8_budget:
                raise ValueError("export.adapters=separate keeps the LoRA branches fp32 through the "
                                 "model builder: set export.quantizer=builder and "
                                 "export.sensitivity.int8_budget=0, or export.adapters=merged")
            if self.recipe == "auto" and self.search.candidates != list(DEFAULT_CANDIDATES):
                named = {n: SEPARATE_REFUSALS[n] for n in self.search.candidates
                         if n in SEPARATE_REFUSALS}
                if named:  # the default list leaves them out itself, saying why (recipes)
                    raise ValueError(
                        "export.search.candidates: export.adapters=separate cannot build "
                        + "; ".join(f"{n} ({why})" for n, why in named.items())
                        + f"; drop {'them' if len(named) > 1 else 'it'} from the list, or use "
                        "export.adapters=merged")
            if "adapter_path" in self.extra_options:
                raise ValueError("export.extra_options: adapter_path is set by "
                                 "export.adapters=separate (a zero adapter of the fine-tune's "
                                 "shape); drop it from extra_options")
        if self.sensitivity.int8_budget and self.precision != "int4":
            raise ValueError("export.sensitivity.int8_budget keeps int4 MatMuls at int8: set "
                             "export.precision=int4 or the budget to 0")
        return self


class EvaluateConfig(_Config):
    """Evaluation on the held-out split: base, merged (PyTorch) and exported (onnxruntime-genai)."""

    max_accuracy_drop: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        title="Max accuracy drop",
        description="Quality gate: the run fails when exported accuracy < merged - this.",
    )
    max_new_tokens: int = Field(
        8, ge=1, le=256, title="Max new tokens", description="Greedy tokens generated per example."
    )
    limit: int | None = Field(
        None, ge=1, title="Limit", description="Evaluate only the first N rows of each set (null: all)."
    )
    max_examples: int | None = Field(
        None, ge=1, title="Max examples",
        description="Evaluate at most this many rows of each set: a stratified sample (each "
        "label's share of the set kept, largest remainders rounded up), the same rows for every "
        "model, chosen by sample_seed; recorded in each evaluation (`sample`) and the report. "
        "For large eval sets: an evaluation then costs N rows and two quick reads of the set "
        "(bench.scaling). null: all rows.",
    )
    sample_seed: int = Field(
        0, title="Sample seed",
        description="Seed of the max_examples sample (a hash of the seed and each row's line "
        "number orders each label's rows: the same rows whatever the file's order).",
    )
    extra_files: list[PathSpec] | None = Field(
        None,
        title="Extra eval sets",
        description="More labelled files in the data's format, evaluated on every model beside "
        "the eval split and reported each on its own, by file name (e.g. phrasings unlike the "
        "training rows'). null: the bundled shifted set (tones_shifted.jsonl) when training on "
        "the bundled tones data, else none; []: none.",
    )
    gate_set: str = Field(
        "eval",
        title="Gate set",
        description="The set the quality gate judges: eval (the eval split) or an extra set by "
        "its file name without the extension (e.g. tones_shifted).",
        min_length=1,
    )
    compare_merged_export: bool = Field(
        False,
        title="Compare with the merged export",
        description="With export.adapters=separate: also export the merged model with the same "
        "recipe and evaluate it on every set, reported beside the separate form (base + adapter) "
        "as exported_merged. The quality gate judges the separate form (the published one).",
    )
    constrained: bool = Field(
        False,
        title="Gate on constrained answers",
        description="false: the quality gate compares free (greedy) answers. true: it compares "
        "constrained ones (the exported model generating inside the label set's regex, the merged "
        "model's top-scored label). Both accuracies are reported either way.",
    )


def eval_set_name(spec: str) -> str:
    """An extra eval set's name in reports and in evaluate.gate_set: its file name's stem."""
    return spec.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0] or spec
