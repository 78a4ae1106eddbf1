"""Olive's `passes` → slmflow's `finetune.*`, `merge` and `export.*`.

slmflow runs one LoRA or QLoRA pass, then merges and exports: `MergeAdapterWeights` and
`ModelBuilder` passes are optional (slmflow does both anyway) and must come in that order.
"""

from __future__ import annotations

import math
from typing import Any

from slmflow.olive.core import (
    Map,
    Noted,
    Refused,
    Section,
    Special,
    Table,
    Translator,
    given,
    is_number,
    show,
)
from slmflow.olive.data import DATA_CONFIG, data_config_named
from slmflow.olive.model import DTYPE
from slmflow.olive.systems import SYSTEM_REF

KINDS = {"lora": "lora", "qlora": "qlora", "mergeadapterweights": "merge", "modelbuilder": "builder",
         "extractadapters": "extract"}
REFUSED_PASSES = ("LoHa", "LoKr", "DoRA", "LoftQ", "OnnxConversion", "OnnxPeepholeOptimizer",
                  "OrtTransformersOptimization", "OnnxMatMul4Quantizer", "OnnxStaticQuantization",
                  "OnnxDynamicQuantization", "GptqQuantizer", "AutoAWQQuantizer", "QuaRot",
                  "SliceGPT", "SparseGPT", "CaptureSplitInfo", "SplitModel",
                  "OrtSessionParamsTuning", "IncQuantization", "OpenVINOConversion",
                  "QNNConversion", "GraphSurgeries", "OnnxFloatToFloat16", "MatMulNBitsToQDQ")
PASS_TYPES = ("LoRA", "QLoRA", "MergeAdapterWeights", "ModelBuilder", "ExtractAdapters",
              *REFUSED_PASSES)
ORDER = {"lora": 0, "qlora": 0, "merge": 1, "builder": 2, "extract": 3}
PRECISIONS = ("int4", "int8", "fp16", "fp32")
BUILDER_OPTION = str | bool | int | float


def handle_passes(t: Translator, value: Any, path: str, node: dict) -> None:
    value = t.mapping(value, path, "a mapping of named passes")
    for name, conf in value.items():
        ppath = f"{path}.{name}"
        if isinstance(conf, list):
            if len(conf) != 1:
                raise t.error(ppath, "not supported: slmflow runs one configuration per pass")
            conf = conf[0]
        if not isinstance(conf, dict) or "type" not in conf:
            raise t.error(ppath, "a pass needs a type (LoRA, QLoRA, MergeAdapterWeights, "
                                 "ModelBuilder)")
        kind = pass_kind(t, conf["type"], f"{ppath}.type")
        t.passes.append((kind, str(name), f"{ppath}.type", conf["type"]))
        t.pass_type = kind
        t.walk(conf, {"lora": LORA, "qlora": LORA, "merge": MERGE, "builder": BUILDER,
                      "extract": EXTRACT}[kind], ppath)


def pass_kind(t: Translator, value: Any, path: str) -> str:
    kind = str(value).lower()
    if kind in KINDS:
        return KINDS[kind]
    if kind in (p.lower() for p in PASS_TYPES):
        raise t.error(path, f"not supported: the {value} pass; slmflow runs LoRA or QLoRA, "
                            "MergeAdapterWeights and ModelBuilder")
    raise t.unknown(path, value, list(PASS_TYPES), "pass type")


def handle_pass_type(t: Translator, value: Any, path: str, node: dict) -> None:
    became = {"lora": "fine-tuning (finetune.*)", "qlora": "fine-tuning (finetune.*)",
              "merge": "merge (into the full-precision base; merge.*)",
              "builder": "export with onnxruntime-genai's model builder (export.*)",
              "extract": "the adapter apart from the int4 base: export.adapters = \"separate\" "
                         "(one .onnx_adapter file, switched with onnxruntime-genai's Adapters)"}
    t.note(path, value, became[t.pass_type])


def finish_passes(t: Translator) -> None:
    """One fine-tuning pass, then merge, then export; finetune.method from the pass type."""
    kinds = [kind for kind, *_ in t.passes]
    tuning = [p for p in t.passes if p[0] in ("lora", "qlora")]
    adapter = t.set_by.get("finetune.adapter_path")  # the input model's trained adapter
    if adapter and tuning:
        # Olive's LoRA passes load the base without its adapter and stop: "Model already has an
        # adapter. Please provide a model without an adapter." (load_hf_base_model)
        raise t.error(tuning[0][2], f"not supported with {adapter}: Olive's {show(tuning[0][3])} "
                                    "pass refuses an input model that has an adapter; drop "
                                    "adapter_path to train a new adapter, or drop this pass to "
                                    "merge or export the given one")
    if len(tuning) != 1 and not adapter:
        raise t.error("passes", f"slmflow runs one LoRA or QLoRA pass, found {len(tuning)}; its "
                                "pipeline is fine-tune → merge → export (or give a trained "
                                "adapter: input_model.adapter_path, and no LoRA pass)")
    ranks = [ORDER[k] for k in kinds]
    if ranks != sorted(ranks) or len(set(kinds)) < len(kinds):
        raise t.error("passes", f"slmflow runs fine-tune → merge → export; the passes here are in "
                                f"another order or repeat: {[show(p[3]) for p in t.passes]}")
    names = [name for _, name, _, _ in t.passes]
    if tuning:
        kind, _, path, _ = tuning[0]
        method = "qlora" if kind == "qlora" or t.qlora_by else "lora"
        t.put("finetune.method", method, path)
        why = f" ({t.qlora_by} in a LoRA pass: QLoRA)" if kind == "lora" and t.qlora_by else ""
        t.extend(path, f"finetune.method = {show(method)}{why}")
    if "extract" in kinds:
        if "merge" in kinds:
            raise t.error("passes", "MergeAdapterWeights merges the adapter into the base and "
                                    "ExtractAdapters keeps it apart: keep one of them")
        where = next(p for k, _, p, _ in t.passes if k == "extract")
        t.put("export.adapters", "separate", where)
    elif "merge" not in kinds:
        t.note("passes", names, "noted: no MergeAdapterWeights pass: slmflow merges the adapter "
                                "into the base before exporting anyway")
    if "builder" not in kinds:
        t.note("passes", names, "noted: no ModelBuilder pass: slmflow exports the merged model "
                                "anyway (export.*, int4 by default)")
    for name, (where, _) in t.data_configs.items():
        if name not in t.used_data:
            t.note(where, name, "noted: no pass names this data config; not used")


# ---- LoRA / QLoRA -------------------------------------------------------------------------------
def handle_train_data_config(t: Translator, value: Any, path: str, node: dict) -> None:
    where, dc = data_config_named(t, value, path)
    t.note(path, value, f"the data config at {where} → data.*")
    t.walk(dc, DATA_CONFIG, where)


def handle_eval_data_config(t: Translator, value: Any, path: str, node: dict) -> None:
    if value is None:
        t.note(path, value, "noted: null: eval_split of the training data is held out")
        return
    where, dc = data_config_named(t, value, path)
    t.note(path, value, f"the data config at {where} → data.eval_file (the same template)")
    t.eval_mode = True
    try:
        t.walk(dc, DATA_CONFIG, where)
    finally:
        t.eval_mode = False


def handle_eval_dataset_size(t: Translator, value: Any, path: str, node: dict) -> None:
    if value is not None and not (is_number(value) and 0 < value < 1):
        raise t.error(path, f"give a fraction between 0 and 1 (e.g. 0.3), got {show(value)}")
    t.apply(Map("data.eval_split", "held out for evaluation"), value, path, node)


def handle_quant(t: Translator, value: Any, path: str, node: dict) -> None:
    key = path.rsplit(".", 1)[-1]
    if value is None:
        t.note(path, value, "noted: null: slmflow's default kept")
        return
    became = t.put(f"finetune.{key}", value, path)
    if t.pass_type == "lora" and (key != "double_quant" or value is True):
        t.qlora_by = t.qlora_by or f"{key}: {show(value)}"
        became += " (means QLoRA: finetune.method = \"qlora\")"
    t.note(path, value, became)


# ---- training_args ------------------------------------------------------------------------------
def positive_max_steps(node: dict) -> int | None:
    """training_args' max_steps where it is a positive whole number, else None."""
    steps = node.get("max_steps")
    if is_number(steps) and steps > 0 and steps == int(steps):
        return int(steps)
    return None


def handle_epochs(t: Translator, value: Any, path: str, node: dict) -> None:
    became = t.put("finetune.epochs", value, path)
    if steps_or_none(node.get("max_steps")) is None:  # transformers: the epochs decide
        became += "; " + t.put("finetune.max_steps", None, path) + " (the epochs decide)"
    else:  # a wrong max_steps is named by its own key's check (finetune.max_steps)
        became += " (max_steps wins, as in transformers)"
    t.note(path, value, became)


def handle_warmup_ratio(t: Translator, value: Any, path: str, node: dict) -> None:
    if value is not None and not (is_number(value) and 0 <= value <= 1):
        raise t.error(path, f"give a fraction between 0 and 1 (e.g. 0.1), got {show(value)}")
    steps = positive_max_steps(node)
    if "warmup_steps" in node or not value:
        t.note(path, value, "noted: warmup_steps decides (as in transformers)")
    elif steps is None:
        raise t.error(path, "not supported without max_steps (a positive whole number): give "
                            "warmup_steps instead")
    else:
        t.note(path, value, t.put("finetune.warmup_steps", math.ceil(value * steps), path))


def steps_or_none(value: Any) -> Any:
    """transformers' max_steps ≤ 0 (false included) means "the epochs decide": slmflow's null."""
    return None if isinstance(value, int | float) and value <= 0 else value


# ---- ModelBuilder -------------------------------------------------------------------------------
def handle_precision(t: Translator, value: Any, path: str, node: dict) -> None:
    if value not in PRECISIONS:
        raise t.error(path, f"not supported: precision {given(value)}; slmflow exports int4, int8, "
                            "fp16 or fp32")
    became = t.put("export.precision", value, path)
    if value in ("int4", "int8") and "int4_algo_config" not in node:
        became += (" (quantized with export.algo_config k_quant, slmflow's default: the "
                   "builder's RTN default lost 6.3 points here; int4_algo_config: default gives "
                   "Olive's)")
    t.note(path, value, became)


def handle_builder_extra(t: Translator, value: Any, path: str, node: dict) -> None:
    value = t.mapping(value, path, "a mapping of builder options (KEY: VALUE)")
    for key, option in value.items():
        if not (isinstance(key, str) and key.strip() and "." not in key):
            raise t.error(f"{path}.{key}", "a builder option is a name without dots")
        if not isinstance(option, BUILDER_OPTION):
            raise t.error(f"{path}.{key}", f"a builder option is a string, number or boolean, got "
                                           f"{show(option)}")
    t.note(path, value, "; ".join(t.put(f"export.extra_options.{k}", v, path)
                                  for k, v in value.items()))


def joined(separator: str) -> Any:
    """Olive's list → the builder's `a<sep>b` option (a list of strings only)."""
    def join(value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return separator.join(value)
        return value
    return join


EVALUATOR = Refused("slmflow evaluates with its own metrics; remove evaluator")
PASS = {
    "type": Special(handle_pass_type, "LoRA / QLoRA → `finetune.method` lora / qlora; "
                    "MergeAdapterWeights → merge; ModelBuilder → export; ExtractAdapters → "
                    "`export.adapters` separate; other passes refused"),
    "host": SYSTEM_REF,
    "evaluator": EVALUATOR,
    "disable_search": Noted("slmflow never searches"),
    "clean_run_cache": Noted("slmflow's cache is keyed by content"),
    "output_name": Noted("slmflow names stage outputs by their content key"),
}
QUANT_DOC = "→ `finetune.{}`; in a LoRA pass it means QLoRA"
LORA_ONLY = {
    "lora_r": Map("finetune.r"),
    "r": Map("finetune.r"),
    "lora_alpha": Map("finetune.alpha", "honoured: Olive 0.13 drops lora_alpha silently and uses "
                      "16"),
    "alpha": Map("finetune.alpha"),
    "lora_dropout": Map("finetune.dropout"),
    "target_modules": Map("finetune.target_modules", "honoured for QLoRA too; Olive's QLoRA adapts "
                          "every 4-bit linear layer instead"),
    "double_quant": Special(handle_quant, "→ `finetune.double_quant`; true in a LoRA pass means "
                            "QLoRA (`finetune.method` qlora), as the seed intends"),
    "quant_type": Special(handle_quant, QUANT_DOC.format("quant_type")),
    "compute_dtype": Special(handle_quant, QUANT_DOC.format("compute_dtype")),
    "save_quant_config": Noted("slmflow merges the adapter into the full-precision base, never "
                               "into the 4-bit one"),
    "train_data_config": Special(handle_train_data_config, "the data config it names → `data.*`"),
    "eval_data_config": Special(handle_eval_data_config, "the data config it names → "
                                "`data.eval_file` (its template must be the same)"),
    "eval_dataset_size": Special(handle_eval_dataset_size, "a fraction → `data.eval_split`"),
    "training_args": None,  # set below: TRAINING_ARGS
    "torch_dtype": DTYPE,
    "device_map": Noted("slmflow places the model with finetune.device"),
    "allow_tf32": Noted("PyTorch's TF32 default applies"),
    "bias": Refused("slmflow trains no bias terms", ok=(None, "none")),
    "modules_to_save": Refused("slmflow trains adapter weights only", ok=(None, [])),
    "use_ort_trainer": Refused("slmflow trains with the transformers Trainer", ok=(None, False)),
    "ortmodule_onnx_opset_version": Noted("only for use_ort_trainer, which slmflow does not use"),
    "ephemeral_gpu_offload": Refused("slmflow keeps the model on one device", ok=(None, False)),
    "loftq_iter": Refused("LoftQ is not supported; use QLoRA"),
}
LOGS_EVERY_STEP = Noted("slmflow logs the loss every step")
EVAL_NOTE = Noted("slmflow evaluates after training, on the held-out split (base, merged, exported)")
CHECKPOINTS = Noted("slmflow checkpoints every finetune.checkpoint_every steps in the stage's work "
                    "folder and resumes from the last one by itself")
FLOAT32 = Refused("slmflow trains in float32 (QLoRA: finetune.compute_dtype)", ok=(None, False))
ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "paged_adamw_32bit", "adamw_8bit",
         "paged_adamw_8bit")
TRAINING_ARGS = Table({
    "seed": Map("finetune.seed"),
    "data_seed": Map("data.seed", "the train/eval split seed; batch order follows finetune.seed"),
    "per_device_train_batch_size": Map("finetune.batch_size"),
    "per_device_eval_batch_size": Noted("slmflow evaluates one prompt at a time (greedy "
                                        "generation)"),
    "gradient_accumulation_steps": Map("finetune.gradient_accumulation_steps"),
    "gradient_checkpointing": Map("finetune.gradient_checkpointing"),
    "learning_rate": Map("finetune.learning_rate"),
    "num_train_epochs": Special(handle_epochs, "→ `finetune.epochs`; max_steps wins when set, as "
                                "in transformers (without max_steps, `finetune.max_steps` null)"),
    "max_steps": Map("finetune.max_steps", convert=steps_or_none),
    "warmup_steps": Map("finetune.warmup_steps"),
    "warmup_ratio": Special(handle_warmup_ratio, "→ `finetune.warmup_steps` = ceil(ratio × "
                            "max_steps); needs max_steps"),
    "weight_decay": Map("finetune.weight_decay"),
    "lr_scheduler_type": Map("finetune.lr_scheduler"),
    "adam_beta2": Map("finetune.adam_beta2"),
    "max_grad_norm": Map("finetune.max_grad_norm"),
    "group_by_length": Map("finetune.group_by_length"),
    "save_steps": Map("finetune.checkpoint_every"),
    "logging_steps": Noted("slmflow logs the loss every step (report.json training.loss_curve)"),
    "logging_strategy": LOGS_EVERY_STEP,
    "logging_first_step": LOGS_EVERY_STEP,
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
    "fp16": FLOAT32,
    "bf16": FLOAT32,
    "tf32": Noted("PyTorch's TF32 default applies"),
    "report_to": Noted("slmflow writes report.json and Prefect artifacts"),
    "disable_tqdm": Noted("slmflow logs progress itself"),
    "dataloader_num_workers": Noted("slmflow loads batches in the training process"),
    "remove_unused_columns": Noted("slmflow's rows hold only model inputs"),
    "load_best_model_at_end": Refused("slmflow keeps the last step's adapter", ok=(None, False)),
    "deepspeed": Refused("slmflow trains on one device without DeepSpeed", ok=(None, False)),
})
TRAINING_ARGS.keys["extra_args"] = Section(TRAINING_ARGS)  # transformers' extras: the same keys
LORA_ONLY["training_args"] = Section(TRAINING_ARGS)
WHOLE_MODEL = Refused("slmflow evaluates the whole exported model", ok=(None, False))
BUILDER_ONLY = {
    "precision": Special(handle_precision, "→ `export.precision` (int4, int8, fp16, fp32); int4 "
                         "uses `export.algo_config` (slmflow's default k_quant unless "
                         "int4_algo_config is given)"),
    "int4_block_size": Map("export.block_size"),
    "int4_accuracy_level": Map("export.accuracy_level"),
    "int4_algo_config": Map("export.algo_config"),
    "int4_is_symmetric": Map("export.extra_options.is_symmetric"),
    "int4_op_types_to_quantize": Map("export.extra_options.op_types_to_quantize",
                                     convert=joined("/")),
    "int4_nodes_to_exclude": Map("export.extra_options.nodes_to_exclude", convert=joined(",")),
    "extra_options": Special(handle_builder_extra, "→ `export.extra_options` (each KEY=VALUE)"),
    "enable_cuda_graph": Map("export.extra_options.enable_cuda_graph"),
    "use_qdq": Map("export.extra_options.use_qdq"),
    "use_cuda_bf16": Map("export.extra_options.use_cuda_bf16"),
    "use_webgpu_fp32": Map("export.extra_options.use_webgpu_fp32"),
    "use_8bits_moe": Map("export.extra_options.use_8bits_moe"),
    "metadata_only": Refused("slmflow exports the whole model", ok=(None, False)),
    "search": Refused("slmflow's evaluation decodes greedily; set generation options in the "
                      "exported genai_config.json", ok=(None, {})),
    "exclude_embeds": WHOLE_MODEL,
    "exclude_lm_head": WHOLE_MODEL,
    "include_hidden_states": Refused("slmflow evaluates generated text", ok=(None, False)),
}
EXTRACT_ONLY = {
    "adapter_type": Refused("slmflow exports LoRA adapters only", ok=(None, "lora", "LORA")),
    "make_inputs": Refused("slmflow makes the LoRA weights graph inputs (their zero initializers "
                           "kept as defaults), as make_inputs true", ok=(None, True)),
    "save_format": Refused("slmflow writes onnxruntime's .onnx_adapter files",
                           ok=(None, "onnx_adapter")),
    "dynamic_lora_r": Noted("slmflow's base build has one fixed rank (finetune.r); an adapter of "
                            "another rank is refused naming both, and gets its own base build"),
    "optional_inputs": Noted("the LoRA inputs are optional: without an adapter the base model "
                             "runs as it is"),
    "pack_inputs": Refused("slmflow keeps one input per LoRA weight", ok=(None, False)),
}
LORA = Table({**PASS, **LORA_ONLY}, wrapper="config")
EXTRACT = Table({**PASS, **EXTRACT_ONLY}, wrapper="config")
MERGE = Table(dict(PASS), wrapper="config")
BUILDER = Table({**PASS, **BUILDER_ONLY}, wrapper="config")
