"""The Olive keys slmflow knows, section by section, and what each one becomes.

Every key of an Olive config is looked up here: `Map` copies the value to a slmflow key, `Noted`
accepts it without effect (with the reason), `Refused` stops with the reason (unless the value
asks for nothing slmflow does not do), `Special` is handled by a method of the translator in
`slmflow.olive`, `Section` is a nested mapping with its own table. Both dialects are listed: the
seed's (Olive of 2024: `lora_r`, `hf_config`, `corpus_strategy`, `source_max_len`, nested
`config`/`params`) and Olive 0.13's (`r`, `alpha`, `HfModel`, `strategy`, `max_seq_len`, flat
keys, engine keys at the top level). The README's "Olive configs" table is generated from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Map:
    """The value goes to the slmflow key `to` (dotted), through `convert` when given."""

    to: str
    why: str = ""
    convert: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Noted:
    """Accepted without effect: `why` says what slmflow does instead."""

    why: str


@dataclass(frozen=True)
class Refused:
    """Refused with `why`, unless the value is one of `ok` (Olive's default or slmflow's way)."""

    why: str
    ok: tuple = (None,)


@dataclass(frozen=True)
class Special:
    """Handled by `_<handler>` of the translator; `doc` is its README line."""

    handler: str
    doc: str


@dataclass(frozen=True)
class Section:
    """A nested mapping, read with the table named `table`."""

    table: str


def _slashes(v: Any) -> Any:
    return "/".join(v) if isinstance(v, list) else v


def _commas(v: Any) -> Any:
    return ",".join(v) if isinstance(v, list) else v


def _steps(v: Any) -> Any:
    return None if isinstance(v, int | float) and v <= 0 else v


SYSTEM_REF = Special("system_ref", "a system name (or inline system): LocalSystem: this machine; "
                     "AzureML: the AzureML target, not in this build (the run stops with a message)")
TASK = Special("task", "text-generation only (slmflow fine-tunes causal LMs)")
EVAL_NOTE = Noted("slmflow evaluates after training, on the held-out split (base, merged, exported)")
AML = Special("aml_setting", "a setting of the AzureML target (not in this build; kept in the notes)")
CHECKPOINTS = Noted("slmflow checkpoints every finetune.checkpoint_every steps in the stage's work "
                    "folder and resumes from the last one by itself")
DTYPE = Noted("slmflow trains the LoRA base in float32 (bf16 was 22x slower on CPUs without bf16); "
              "QLoRA computes in finetune.compute_dtype; merge.dtype for the merge")
OLIVE_FILLS = Noted("Olive fills it from input_model; slmflow uses the base model's tokenizer")
ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "paged_adamw_32bit", "adamw_8bit",
         "paged_adamw_8bit")

TABLES: dict[str, dict[str, Any]] = {
    "TOP": {
        "input_model": Special("input_model", "the base model (below)"),
        "data_configs": Special("data_configs", "read where a pass names them (train_data_config, "
                                "eval_data_config); a data config no pass names is noted as unused"),
        "passes": Special("passes", "a LoRA or QLoRA pass, then optionally MergeAdapterWeights and "
                          "ModelBuilder, in that order (slmflow always merges and exports)"),
        "systems": Special("systems", "named systems (below); they matter where engine.host/target "
                           "or a pass's host names them"),
        "engine": Section("ENGINE"),
        "workflow_id": Noted("Olive's run name; slmflow names a run by output_dir"),
        "workflow_host": SYSTEM_REF,
        "azureml_client": Noted("the AzureML workspace for azureml references; each such reference "
                                "stops the run (the AzureML target is not in this build)"),
        "evaluators": Refused("slmflow evaluates base, merged and exported models itself (accuracy, "
                              "macro F1, latency on the held-out split); remove evaluators",
                              ok=(None, {})),
        "auto_optimizer_config": Refused("slmflow runs a fixed pipeline, not Olive's auto-optimizer; "
                                         "list the passes instead", ok=(None, {})),
    },
    "ENGINE": {
        "host": SYSTEM_REF,
        "target": SYSTEM_REF,
        "execution_providers": Special(
            "execution_providers", "→ `export.execution_provider`: CUDAExecutionProvider → cuda "
            "(and `finetune.device` auto), CPUExecutionProvider → cpu, DmlExecutionProvider → dml; "
            "other providers, or more than one, refused"),
        "output_dir": Map("output_dir", "report.json, report.md, and the stage cache unless "
                          "cache_dir is set"),
        "cache_dir": Map("cache_dir", "content-keyed stage outputs, the int4 model among them"),
        "log_severity_level": Noted("slmflow logs each stage to stderr (and to Prefect)"),
        "ort_log_severity_level": Noted("slmflow logs each stage to stderr (and to Prefect)"),
        "ort_py_log_severity_level": Noted("slmflow logs each stage to stderr (and to Prefect)"),
        "log_to_file": Noted("slmflow logs to stderr; redirect it to keep a file"),
        "search_strategy": Refused("slmflow runs each pass once; it does not search over pass "
                                   "parameters", ok=(None, False)),
        "evaluate_input_model": Noted("slmflow always evaluates the base model too (models.base)"),
        "evaluator": Refused("slmflow evaluates with its own metrics; remove evaluator"),
        "packaging_config": Refused("slmflow writes the model folder (model.onnx, genai_config.json, "
                                    "tokenizer) under cache_dir; package it yourself"),
        "cache_config": Refused("name the cache folder with cache_dir", ok=(None, {})),
        "clean_cache": Noted("slmflow's cache is keyed by content: a stage is reused only when its "
                             "inputs are the same"),
        "clean_evaluation_cache": Noted("slmflow's cache is keyed by content: a stage is reused only "
                                        "when its inputs are the same"),
        "enable_shared_cache": Refused("set slmflow's `cache_remote` (an fsspec URL such as "
                                       "az://CONTAINER/PREFIX) instead; runs that share cache_dir "
                                       "reuse each other's stages", ok=(None, False)),
        "plot_pareto_frontier": Refused("slmflow does not search, so there is no Pareto frontier",
                                        ok=(None, False)),
        "no_artifacts": Noted("slmflow always writes report.json and keeps the stage outputs"),
    },
    "INPUT_MODEL": {
        "type": Special("model_type", "PyTorchModel or HfModel: a transformers causal LM "
                        "(`model.source` hf); ONNXModel and other types refused"),
        "model_path": Special(
            "model_path", "a hub id or local folder → `model.name_or_path`; an "
            "azureml_registry_model (or azureml://registries/... URI) → `model.source` "
            "azureml_registry with `model.registry_name`, `model.version`: the AzureML target, "
            "not in this build (the run stops with a message)"),
        "hf_config": Section("HF_CONFIG"),
        "task": TASK,
        "load_kwargs": Section("LOAD_KWARGS"),
        "model_file_format": Noted("the registry model's file layout (PyTorch.MLflow), read by the "
                                   "AzureML target"),
        "adapter_path": Refused("slmflow trains a new adapter on the base; merge an existing "
                                "adapter into the base model first"),
        "io_config": Noted("the model builder derives the inputs and outputs from the model"),
        "generative": Noted("slmflow's models are generative"),
        "model_attributes": Refused("slmflow reads the model's attributes from its config.json"),
        "model_loader": Refused("slmflow loads transformers models only, no model scripts"),
        "model_script": Refused("slmflow loads transformers models only, no model scripts"),
        "script_dir": Refused("slmflow loads transformers models only, no model scripts"),
        "dummy_inputs_func": Refused("slmflow loads transformers models only, no model scripts"),
    },
    "HF_CONFIG": {
        "model_name": Special("hf_model_name", "→ `model.name_or_path` (a hub id or local folder), "
                              "unless model_path names the model"),
        "task": TASK,
        "model_class": Noted("slmflow loads the model with AutoModelForCausalLM"),
        "model_loading_args": Section("LOAD_KWARGS"),
        "from_pretrained_args": Section("LOAD_KWARGS"),
        "components": Refused("slmflow exports with onnxruntime-genai's model builder, which needs "
                              "no components"),
    },
    "LOAD_KWARGS": {
        "trust_remote_code": Map("model.trust_remote_code"),
        "revision": Map("model.revision"),
        "torch_dtype": DTYPE,
        "dtype": DTYPE,
        "attn_implementation": Noted("transformers picks the attention implementation"),
        "device_map": Noted("slmflow places the model with finetune.device"),
        "low_cpu_mem_usage": Noted("transformers' default applies"),
        "quantization_method": Refused("slmflow quantizes the base itself for QLoRA (a QLoRA pass)"),
        "quantization_config": Refused("slmflow quantizes the base itself for QLoRA (a QLoRA pass)"),
    },
    "DATA_CONFIG": {
        "name": Noted("the name that train_data_config / eval_data_config refer to"),
        "type": Special("data_type", "HuggingfaceContainer: slmflow reads the same data itself "
                        "(a .json/.jsonl/.csv/.parquet file, or hf:NAME); other containers refused"),
        "load_dataset_config": Section("LOAD_DATASET"),
        "pre_process_data_config": Section("PRE_PROCESS"),
        "post_process_data_config": Refused("slmflow's post-processing is fixed: the prompt is the "
                                            "template up to the label", ok=(None, {})),
        "dataloader_config": Noted("slmflow batches training rows by finetune.batch_size and "
                                   "evaluates one prompt at a time"),
        "user_script": Refused("slmflow runs no user scripts; describe the text with text_template"),
        "script_dir": Refused("slmflow runs no user scripts; describe the text with text_template"),
    },
    "LOAD_DATASET": {
        "type": Special("component_type", "huggingface_dataset only"),
        "data_name": Special("data_name", "json, csv, parquet (with data_files): a local file; "
                             "another name: a Hugging Face dataset → `data.train_file` hf:NAME"),
        "data_files": Special(
            "data_files", "a local file → `data.train_file` (its distinct labels → `data.labels`); "
            "an azureml_datastore reference → the AzureML target, not in this build (the run "
            "stops with a message)"),
        "split": Special("split", "→ `data.hf_split` for a Hugging Face dataset; a local file is "
                         "one split (train)"),
        "subset": Refused("slmflow loads Hugging Face datasets without a subset; save the subset "
                          "to a file"),
        "data_dir": Refused("name the data file with data_files"),
        "col_filters": Refused("filter the rows into a file first", ok=(None, {})),
        "trust_remote_code": Noted("slmflow runs no dataset scripts"),
        "streaming": Refused("slmflow reads the whole data file", ok=(None, False)),
    },
    "PRE_PROCESS": {
        "type": Special("component_type", "huggingface_pre_process or "
                        "text_generation_huggingface_pre_process"),
        "dataset_type": Special("dataset_type", "corpus (text from text_cols/text_template); "
                                "other dataset types refused"),
        "text_cols": Map("data.text_columns", convert=lambda v: [v] if isinstance(v, str) else v),
        "text_template": Special(
            "text_template", "→ `data.text_template`; its last placeholder is the label column "
            "(`data.label_column`): the model is prompted with the text before it"),
        "corpus_strategy": Special(
            "strategy", "join → `data.corpus_strategy` join (rows joined by EOS, cut into "
            "max_seq_len chunks, loss on every token, as Olive); line-by-line → line_by_line "
            "(loss on the answer: finetune.loss_on); random and sliding-window strategies refused"),
        "strategy": Special("strategy", "Olive 0.13's name for corpus_strategy (same values)"),
        "source_max_len": Map("data.max_seq_len", "join: the chunk length; line_by_line: a longer "
                              "row is an error, Olive truncates it"),
        "max_seq_len": Map("data.max_seq_len", "join: the chunk length; line_by_line: a longer "
                           "row is an error, Olive truncates it"),
        "pad_to_max_len": Noted("slmflow pads each batch to its longest row; padding is masked"),
        "use_attention_mask": Noted("slmflow always passes an attention mask that hides padding"),
        "add_special_tokens": Refused("slmflow always adds the tokenizer's special tokens and EOS",
                                      ok=(None, True)),
        "joiner": Noted("slmflow separates joined rows by EOS (and BOS where the tokenizer adds one)"),
        "padding_side": Refused("slmflow pads on the right", ok=(None, "right")),
        "drop_short_sequences": Refused("slmflow keeps every row", ok=(None, False)),
        "max_samples": Refused("use a data file with fewer rows"),
        "stride": Refused("only for join-sliding-window, which slmflow does not offer"),
        "random_seed": Noted("only for Olive's random strategies, which slmflow refuses"),
        "random_retries": Noted("only for Olive's random strategies, which slmflow refuses"),
        "processing_batch_size": Noted("tokenization batching; no effect on the result"),
        "chat_template": Refused("write the chat format into text_template", ok=(None, False)),
        "message_col": Refused("write the chat format into text_template"),
        "text_formatting_func": Refused("slmflow runs no user code; use text_template"),
        "user_script": Refused("slmflow runs no user code; use text_template"),
        "script_dir": Refused("slmflow runs no user code; use text_template"),
        "task": TASK,
        "model_name": OLIVE_FILLS,
        "trust_remote_code": OLIVE_FILLS,
    },
    "PASS": {
        "type": Special("pass_type", "LoRA / QLoRA → `finetune.method` lora / qlora; "
                        "MergeAdapterWeights → merge; ModelBuilder → export; other passes refused"),
        "host": SYSTEM_REF,
        "evaluator": Refused("slmflow evaluates with its own metrics; remove evaluator"),
        "disable_search": Noted("slmflow never searches"),
        "clean_run_cache": Noted("slmflow's cache is keyed by content"),
        "output_name": Noted("slmflow names stage outputs by their content key"),
    },
    "LORA": {
        "lora_r": Map("finetune.r"),
        "r": Map("finetune.r"),
        "lora_alpha": Map("finetune.alpha", "honoured: Olive 0.13 drops lora_alpha silently and "
                          "uses 16"),
        "alpha": Map("finetune.alpha"),
        "lora_dropout": Map("finetune.dropout"),
        "target_modules": Map("finetune.target_modules", "honoured for QLoRA too; Olive's QLoRA "
                              "adapts every 4-bit linear layer instead"),
        "double_quant": Special("quant", "→ `finetune.double_quant`; true in a LoRA pass means "
                                "QLoRA (`finetune.method` qlora), as the seed intends"),
        "quant_type": Special("quant", "→ `finetune.quant_type`; in a LoRA pass it means QLoRA"),
        "compute_dtype": Special("quant", "→ `finetune.compute_dtype`; in a LoRA pass it means "
                                 "QLoRA"),
        "save_quant_config": Noted("slmflow merges the adapter into the full-precision base, never "
                                   "into the 4-bit one"),
        "train_data_config": Special("train_data_config", "the data config it names → `data.*`"),
        "eval_data_config": Special("eval_data_config", "the data config it names → "
                                    "`data.eval_file` (its template must be the same)"),
        "eval_dataset_size": Special("eval_dataset_size", "a fraction → `data.eval_split`"),
        "training_args": Section("TRAINING_ARGS"),
        "torch_dtype": DTYPE,
        "device_map": Noted("slmflow places the model with finetune.device"),
        "allow_tf32": Noted("PyTorch's TF32 default applies"),
        "bias": Refused("slmflow trains no bias terms", ok=(None, "none")),
        "modules_to_save": Refused("slmflow trains adapter weights only", ok=(None, [])),
        "use_ort_trainer": Refused("slmflow trains with the transformers Trainer", ok=(None, False)),
        "ortmodule_onnx_opset_version": Noted("only for use_ort_trainer, which slmflow does not use"),
        "ephemeral_gpu_offload": Refused("slmflow keeps the model on one device", ok=(None, False)),
        "loftq_iter": Refused("LoftQ is not supported; use QLoRA"),
    },
    "TRAINING_ARGS": {
        "seed": Map("finetune.seed"),
        "data_seed": Map("data.seed", "the train/eval split seed; batch order follows "
                         "finetune.seed"),
        "per_device_train_batch_size": Map("finetune.batch_size"),
        "per_device_eval_batch_size": Noted("slmflow evaluates one prompt at a time (greedy "
                                            "generation)"),
        "gradient_accumulation_steps": Map("finetune.gradient_accumulation_steps"),
        "gradient_checkpointing": Map("finetune.gradient_checkpointing"),
        "learning_rate": Map("finetune.learning_rate"),
        "num_train_epochs": Special("epochs", "→ `finetune.epochs`; max_steps wins when set, as in "
                                    "transformers (without max_steps, `finetune.max_steps` null)"),
        "max_steps": Map("finetune.max_steps", convert=_steps),
        "warmup_steps": Map("finetune.warmup_steps"),
        "warmup_ratio": Special("warmup_ratio", "→ `finetune.warmup_steps` = ceil(ratio × "
                                "max_steps); needs max_steps"),
        "weight_decay": Map("finetune.weight_decay"),
        "lr_scheduler_type": Map("finetune.lr_scheduler"),
        "adam_beta2": Map("finetune.adam_beta2"),
        "max_grad_norm": Map("finetune.max_grad_norm"),
        "group_by_length": Map("finetune.group_by_length"),
        "save_steps": Map("finetune.checkpoint_every"),
        "logging_steps": Noted("slmflow logs the loss every step (report.json training.loss_curve)"),
        "logging_strategy": Noted("slmflow logs the loss every step"),
        "logging_first_step": Noted("slmflow logs the loss every step"),
        "evaluation_strategy": EVAL_NOTE,
        "eval_strategy": EVAL_NOTE,
        "eval_steps": EVAL_NOTE,
        "save_strategy": CHECKPOINTS,
        "save_total_limit": CHECKPOINTS,
        "output_dir": CHECKPOINTS,
        "overwrite_output_dir": CHECKPOINTS,
        "resume_from_checkpoint": Refused("slmflow resumes from its own last checkpoint",
                                          ok=(None, False)),
        "optim": Refused("slmflow trains with AdamW", ok=(None, *ADAMW)),
        "adam_beta1": Refused("slmflow uses AdamW's beta1 0.9", ok=(None, 0.9)),
        "adam_epsilon": Refused("slmflow uses AdamW's epsilon 1e-8", ok=(None, 1e-8)),
        "fp16": Refused("slmflow trains in float32 (QLoRA: finetune.compute_dtype)",
                        ok=(None, False)),
        "bf16": Refused("slmflow trains in float32 (QLoRA: finetune.compute_dtype)",
                        ok=(None, False)),
        "tf32": Noted("PyTorch's TF32 default applies"),
        "report_to": Noted("slmflow writes report.json and Prefect artifacts"),
        "disable_tqdm": Noted("slmflow logs progress itself"),
        "dataloader_num_workers": Noted("slmflow loads batches in the training process"),
        "remove_unused_columns": Noted("slmflow's rows hold only model inputs"),
        "load_best_model_at_end": Refused("slmflow keeps the last step's adapter", ok=(None, False)),
        "deepspeed": Refused("slmflow trains on one device without DeepSpeed", ok=(None, False)),
        "extra_args": Section("TRAINING_ARGS"),
    },
    "BUILDER": {
        "precision": Special("precision", "→ `export.precision` (int4, int8, fp16, fp32); int4 "
                             "uses `export.algo_config` (slmflow's default k_quant_mixed unless "
                             "int4_algo_config is given)"),
        "int4_block_size": Map("export.block_size"),
        "int4_accuracy_level": Map("export.accuracy_level"),
        "int4_algo_config": Map("export.algo_config"),
        "int4_is_symmetric": Map("export.extra_options.is_symmetric"),
        "int4_op_types_to_quantize": Map("export.extra_options.op_types_to_quantize",
                                         convert=_slashes),
        "int4_nodes_to_exclude": Map("export.extra_options.nodes_to_exclude", convert=_commas),
        "extra_options": Special("builder_extra", "→ `export.extra_options` (each KEY=VALUE)"),
        "enable_cuda_graph": Map("export.extra_options.enable_cuda_graph"),
        "use_qdq": Map("export.extra_options.use_qdq"),
        "use_cuda_bf16": Map("export.extra_options.use_cuda_bf16"),
        "use_webgpu_fp32": Map("export.extra_options.use_webgpu_fp32"),
        "use_8bits_moe": Map("export.extra_options.use_8bits_moe"),
        "metadata_only": Refused("slmflow exports the whole model", ok=(None, False)),
        "search": Refused("slmflow's evaluation decodes greedily; set generation options in the "
                          "exported genai_config.json", ok=(None, {})),
        "exclude_embeds": Refused("slmflow evaluates the whole exported model", ok=(None, False)),
        "exclude_lm_head": Refused("slmflow evaluates the whole exported model", ok=(None, False)),
        "include_hidden_states": Refused("slmflow evaluates generated text", ok=(None, False)),
    },
    "SYSTEM": {
        "type": Special("system_type", "LocalSystem: this machine; AzureML: the AzureML target "
                        "(not in this build); Docker, PythonEnvironment, IsolatedORT refused"),
        "accelerators": Special("accelerators", "LocalSystem: the execution_providers of its "
                                "accelerator apply as engine.execution_providers when "
                                "engine.target names it; AzureML: a setting of the target"),
        **{key: AML for key in (
            "aml_compute", "aml_docker_config", "aml_environment_config", "hf_token", "is_dev",
            "olive_managed_env", "requirements_file", "resources", "instance_count",
            "azureml_client_config", "tags", "datastores", "keyvault_name")},
    },
}
TABLES["LORA"] = {**TABLES["PASS"], **TABLES["LORA"]}
TABLES["MERGE"] = dict(TABLES["PASS"])
TABLES["BUILDER"] = {**TABLES["PASS"], **TABLES["BUILDER"]}

# Olive nests settings under `config` (models, passes, systems) or `params` (data components);
# Olive 0.13 also takes them flat. Both forms are read.
WRAPPERS = {"INPUT_MODEL": "config", "LORA": "config", "MERGE": "config", "BUILDER": "config",
            "SYSTEM": "config", "LOAD_DATASET": "params", "PRE_PROCESS": "params"}

FINETUNE_PASSES = {"lora": "lora", "qlora": "qlora"}
OTHER_PASSES = {"mergeadapterweights": "merge", "modelbuilder": "builder"}
REFUSED_PASSES = ("LoHa", "LoKr", "DoRA", "LoftQ", "OnnxConversion", "OnnxPeepholeOptimizer",
                  "OrtTransformersOptimization", "OnnxMatMul4Quantizer", "OnnxStaticQuantization",
                  "OnnxDynamicQuantization", "GptqQuantizer", "AutoAWQQuantizer", "QuaRot",
                  "SliceGPT", "SparseGPT", "ExtractAdapters", "CaptureSplitInfo", "SplitModel",
                  "OrtSessionParamsTuning", "IncQuantization", "OpenVINOConversion",
                  "QNNConversion", "GraphSurgeries", "OnnxFloatToFloat16", "MatMulNBitsToQDQ")
PASS_TYPES = ("LoRA", "QLoRA", "MergeAdapterWeights", "ModelBuilder", *REFUSED_PASSES)
MODEL_TYPES = ("PyTorchModel", "HfModel", "ONNXModel", "CompositeModel", "DistributedHfModel",
               "OpenVINOModel", "QNNModel", "SNPEModel", "TensorFlowModel", "DiffusersModel")
SYSTEM_TYPES = ("LocalSystem", "AzureML", "Docker", "PythonEnvironment", "IsolatedORT")
EXECUTION_PROVIDERS = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu",
                       "DmlExecutionProvider": "dml"}
OTHER_PROVIDERS = ("TensorrtExecutionProvider", "OpenVINOExecutionProvider", "QNNExecutionProvider",
                   "ROCMExecutionProvider", "MIGraphXExecutionProvider", "WebGpuExecutionProvider",
                   "JsExecutionProvider", "NvTensorRTRTXExecutionProvider", "VitisAIExecutionProvider",
                   "CoreMLExecutionProvider")
STRATEGIES = {"line-by-line": "line_by_line", "line_by_line": "line_by_line", "join": "join"}
OTHER_STRATEGIES = ("line-by-line-random", "join-random", "join-sliding-window")
FILE_LOADERS = ("json", "csv", "parquet")

def warmup_steps(ratio: float, max_steps: int) -> int:
    """transformers' rule: ceil(ratio × training steps)."""
    return math.ceil(ratio * max_steps)
