"""The export section (`export.*`, `export.search.*`) and the evaluation (`evaluate.*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from slmflow.config.base import PathSpec, _Config

RecipeName = Literal[
    "int4_rtn_b128", "int4_rtn_b64", "int4_rtn_b32", "int4_rtn_b16", "int4_default",
    "int4_k_quant", "int4_k_quant_last", "int4_k_quant_mixed", "int8", "fp16",
]
ALL_RECIPES: tuple[str, ...] = RecipeName.__args__  # from the smallest expected model up


class RecipeSearchConfig(_Config):
    """What `export.recipe: auto` tries, and how it picks (see slmflow.recipes)."""

    candidates: list[RecipeName] = Field(
        default_factory=lambda: list(ALL_RECIPES),
        min_length=1,
        title="Candidates",
        description="Recipes to export and evaluate: int4 RTN by block size (b16-b128), int4_default "
        "(the builder's own: RTN, block 32), int4 k_quant / k_quant_last / k_quant_mixed, int8, fp16.",
    )
    objective: Literal["smallest", "fastest"] = Field(
        "smallest",
        title="Objective",
        description="Among the candidates within the quality gate, keep the smallest on disk or "
        "the fastest (p50 latency on the eval split).",
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


class ExportConfig(_Config):
    """ONNX export with onnxruntime-genai's model builder."""

    recipe: Literal["manual", "auto"] = Field(
        "manual",
        title="Recipe",
        description="manual: export with precision/algo_config/block_size below; auto: export and "
        "evaluate every candidate of `search`, keep the smallest (or fastest) within the gate.",
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
        "k_quant_mixed",
        title="Quantization algorithm",
        description="int4/int8 recipe. The builder's default (RTN) lost 11.6 points on a "
        "fine-tuned SmolLM2 here; k_quant_mixed lost 1.6 at 30% more size.",
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


def eval_set_name(spec: str) -> str:
    """An extra eval set's name in reports and in evaluate.gate_set: its file name's stem."""
    return spec.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0] or spec
