"""The slmflow pipeline: base model → data prep → fine-tune → merge → export → evaluate → report.

`run_pipeline` is the DAG, written once. The Prefect flow `slmflow_pipeline` runs it with each
stage as a Prefect task (retries, content-keyed cache, persisted results, artifacts);
`slmflow run --no-prefect` runs the same DAG with the plain stage functions.

Run as:
    slmflow run [--config FILE] [--set key=value ...]
    python -m flows.pipeline            # the embedded default, through Prefect
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from prefect import flow

from flows.steps import Runner, Step, chain_runner
from slmflow import recipes
from slmflow.artifacts import ArtifactRef
from slmflow.cache import record_use
from slmflow.config import PipelineConfig
from slmflow.errors import QualityGateError
from slmflow.inputs import RunInputs
from slmflow.manifest import build_manifest, publish_model
from slmflow.preflight import fingerprint, validate_run
from slmflow.qlora import quantization_settings
from slmflow.report import build_report, write_report
from slmflow.store import Store
from slmflow.tracking import tracked


def run_pipeline(config: PipelineConfig, run: Runner, publish: Callable[[dict, Path], None] | None = None,
                 inputs: RunInputs | None = None) -> Path:
    """Run every stage through `run`; write and gate the report.

    `inputs` are the run's resolved inputs when the caller checked them already (`slmflow run`
    does, before starting Prefect); otherwise they are checked and resolved here, before any
    model is loaded.
    """
    started = time.perf_counter()
    if inputs is None or inputs.fingerprint != fingerprint(config):
        inputs = validate_run(config)
    with tracked(config) as tracking:  # one MLflow run per pipeline run (tracking.enabled)
        report, path, model_dir = run_stages(config, run, inputs, started)
        if tracking is not None:
            tracking.log_outcome(report, path, model_dir)
        if publish:
            publish(report, path)
        check_quality_gate(report, path)
    return path


def run_stages(config: PipelineConfig, run: Runner, inputs: RunInputs, started: float
               ) -> tuple[dict[str, Any], Path, Path]:
    """Every stage, the published model and the written report; (report, its path, model dir)."""
    store, out_dir = inputs.store, Path(inputs.output_dir)
    timings: dict[str, dict[str, Any]] = {}

    def steps(*chained: Step) -> list[ArtifactRef]:
        """Run steps (one, or a chain), each recorded in the report under its label."""
        outcomes = chain_runner(run)(list(chained), store)
        for step, (ref, cached, seconds) in zip(chained, outcomes, strict=True):
            timings[step.label] = {"seconds": round(seconds, 3), "cached": cached,
                                   "key": ref.key, "sha256": ref.sha256, "uri": ref.uri}
        return [ref for ref, _, _ in outcomes]

    def stage(label: str, name: str, cfg: Any, **named: Any) -> ArtifactRef:
        return steps(Step(name, label, cfg, named))[0]

    base = stage("base_model", "base_model", config.model, source=inputs.model_source)
    data = stage("prepare_data", "prepare_data", config.data, base=base,
                 train_source=inputs.train_source, eval_source=inputs.eval_source,
                 loss_on=config.finetune.loss_on)
    if inputs.adapter_source is None:
        adapter = stage("finetune", "finetune", config.finetune, base=base, data=data)
    else:  # finetune.adapter_path: the given adapter stands in for the fine-tune's, untrained
        # (placed with the base model: both read an input on this machine)
        [adapter] = steps(Step("given_adapter", "finetune", config.finetune,
                               {"base": base, "source": inputs.adapter_source}, where="base_model"))
    quantization = quantization_settings(config.finetune)  # None for LoRA
    merged = stage("merge", "merge", config.merge, base=base, adapter=adapter, data=data,
                   trust_remote_code=config.model.trust_remote_code, quantization=quantization)

    sets, onnx, search, onnx_adapter = evaluate_and_export(config, inputs, stage, steps, base,
                                                           data, merged, adapter)
    refs = {"base_model": base, "prepare_data": data, "finetune": adapter, "merge": merged,
            "export": onnx}
    if onnx_adapter is not None:
        refs["export_adapter"] = onnx_adapter
    sources = {"model_source": inputs.model_source, "train_source": inputs.train_source,
               "eval_source": inputs.eval_source, "adapter_source": inputs.adapter_source,
               **{f"extra_eval[{name}]": ref for name, ref in inputs.extra_sources.items()}}
    manifest = build_manifest(config, sources, refs)
    if onnx_adapter is None:
        model_dir = publish_model(onnx, out_dir, manifest)
    else:  # the base, this fine-tune's adapter file, and what it was trained on
        from slmflow.bundle import publish_separate, run_entry

        entry = run_entry(config, onnx_adapter, data, manifest["inputs"])
        model_dir = publish_separate(onnx, [entry], out_dir, manifest)
    used = [t["uri"] for t in timings.values()]
    record_use(store.root, out_dir, used, onnx.uri)  # cache ls
    report = build_report(config, data, adapter, merged, onnx, sets, timings,
                          total_seconds=time.perf_counter() - started, exported_dir=model_dir,
                          search=search)
    return report, write_report(report, out_dir), model_dir


def check_quality_gate(report: dict[str, Any], path: Path) -> None:
    """Fail the run (outputs and report kept) when the exported model lost too much accuracy."""
    from slmflow.suggest import gate_hints

    hints = gate_hints(report.get("config") or {}, (report.get("merge") or {}).get("base_weights"))
    search = report.get("export_search")
    if search is not None and search["chosen"] is None:
        from slmflow.recipes import failure_message

        merge_hint = [h for h in hints if h.startswith("merge.")]  # the search gave its own
        raise QualityGateError.for_report(path, f"{failure_message(search)}"
                                          + "".join(f"; or try {h}" for h in merge_hint) + f"; see {path}")
    gate = report["quality_gate"]
    if not gate["passed"]:
        noise = (f"; McNemar p = {gate['mcnemar_p']:.3f}, "
                 + ("within noise on this many rows" if gate["within_noise"] else "beyond noise")
                 if "mcnemar_p" in gate else "")
        raise QualityGateError.for_report(path,
            f"quality gate failed on {gate.get('set', 'eval')}: exported accuracy "
            f"{gate['exported_accuracy']:.4f} is {gate['drop']:.4f} below merged "
            f"{gate['merged_accuracy']:.4f} (allowed {gate['max_accuracy_drop']}){noise}; outputs "
            f"kept, see {path}; try " + " or ".join(hints),
        )


def evaluate_and_export(
    config: PipelineConfig, inputs: RunInputs, stage: Callable[..., ArtifactRef],
    steps: Callable[..., list[ArtifactRef]], base: ArtifactRef, data: ArtifactRef,
    merged: ArtifactRef, adapter: ArtifactRef | None = None,
) -> tuple[dict[str, dict[str, ArtifactRef]], ArtifactRef, dict[str, Any] | None, ArtifactRef | None]:
    """Base and merged (and, after QLoRA, the trained model: the 4-bit base with the adapter)
    evaluated on every set (the split, then each of evaluate.extra_files, prepared with its own
    key), the export (or the recipe search, judged on the validation split when the data has
    one, else on the gate's set), then the exported model on every set; (sets, the export, the
    search, the adapter file's stage with export.adapters=separate).

    Separate form: the exported model is the shared base build with this fine-tune's adapter
    file (with export.recipe auto, each candidate is one); with evaluate.compare_merged_export
    the merged export of the same recipe is evaluated beside it (`exported_merged`)."""

    def evaluate(model: ArtifactRef, label: str, on: ArtifactRef = data,
                 with_adapter: ArtifactRef | None = None, **named: Any) -> ArtifactRef:
        extra = {"adapter": with_adapter} if with_adapter is not None else {}
        return stage(label, "evaluate", config.evaluate, model=model, data=on,
                     labels=config.data.labels, trust_remote_code=config.model.trust_remote_code,
                     **extra, **named)

    def label(who: str, name: str) -> str:
        return f"evaluate_{who}" if name == "eval" else f"evaluate_{who}[{name}]"

    prepared = {"eval": data} | {
        name: stage(f"prepare_data[{name}]", "prepare_data", config.data, base=base,
                    train_source=inputs.train_source, eval_source=source,
                    loss_on=config.finetune.loss_on)
        for name, source in inputs.extra_sources.items()}
    sets = {name: {who: evaluate(model, label(who, name), on)
                   for who, model in (("base", base), ("merged", merged))}
            for name, on in prepared.items()}
    quantization = quantization_settings(config.finetune)
    if quantization is not None and adapter is not None:  # QLoRA: the model as trained
        for name, on in prepared.items():
            sets[name]["trained"] = evaluate(adapter, label("trained", name), on, base=base,
                                             quantization=quantization)
    gate, search, onnx_adapter = config.evaluate.gate_set, None, None
    separate, export_cfg = config.export.adapters == "separate", config.export
    if config.export.recipe == "auto":  # every candidate exported and evaluated, one kept
        # on the validation rows when the data has them: then no reported set made the choice
        if "validation" in data.meta:
            choice = {"merged": evaluate(merged, label("merged", "validation"), split="validation")}
            found = search_export_recipe(config, steps, merged, data, data, choice["merged"],
                                         "validation", base, adapter)
            choice["exported"] = found.evaluation
            sets["validation"] = choice
        else:
            found = search_export_recipe(config, steps, merged, data, prepared[gate],
                                         sets[gate]["merged"], gate, base, adapter)
        onnx, onnx_adapter, search = found.onnx, found.adapter, found.summary
        export_cfg = recipes.candidate_config(config.export, found.recipe)
    elif separate:
        onnx, onnx_adapter = export_separate(config, steps, base, adapter, data)
    else:
        onnx = stage("export", "export", config.export, merged=merged, data=data)
    if separate and config.evaluate.compare_merged_export:  # the same recipe, merged
        merged_onnx = stage("export", "export", export_cfg, merged=merged, data=data)
        for name, on in prepared.items():
            sets[name]["exported_merged"] = evaluate(merged_onnx, label("exported_merged", name), on)
    for name, on in prepared.items():
        sets[name]["exported"] = evaluate(onnx, label("exported", name), on, onnx_adapter)
    return sets, onnx, search, onnx_adapter


def export_separate(config: PipelineConfig, steps: Callable[..., list[ArtifactRef]],
                    base: ArtifactRef, adapter: ArtifactRef | None,
                    data: ArtifactRef) -> tuple[ArtifactRef, ArtifactRef]:
    """export.adapters=separate: the base build shared by every fine-tune of this base, recipe
    and LoRA shape (read from the fine-tune's adapter_config.json), then this adapter's file."""
    from slmflow.stages.export_separate import lora_of

    if adapter is None:
        raise TypeError("export.adapters=separate needs the fine-tune's adapter")
    [onnx_base] = steps(Step("export_base", "export_base", config.export,
                             {"base": base, "lora": lora_of(adapter)}, where="export"))
    [onnx_adapter] = steps(Step("export_adapter", "export_adapter", config.export,
                                {"onnx_base": onnx_base, "adapter": adapter, "data": data},
                                where="export"))
    return onnx_base, onnx_adapter


class Searched(NamedTuple):
    """What the recipe search publishes: the chosen recipe's export (separate form: its base
    build, with this fine-tune's adapter file), its evaluation, the search's record."""

    onnx: ArtifactRef
    adapter: ArtifactRef | None
    evaluation: ArtifactRef
    summary: dict[str, Any]
    recipe: str  # the chosen one, or the most accurate standing in when none holds the gate


def search_export_recipe(
    config: PipelineConfig,
    steps: Callable[..., list[ArtifactRef]],
    merged: ArtifactRef,
    data: ArtifactRef,
    choice_data: ArtifactRef,
    merged_eval: ArtifactRef,
    chosen_on: str,
    base: ArtifactRef | None = None,
    adapter: ArtifactRef | None = None,
) -> Searched:
    """Export and evaluate each candidate recipe on the set `chosen_on` (the validation split,
    or the gate's set), prepared in `choice_data`.

    With no candidate within the gate, the most accurate one stands in (so the report is
    complete) and `summary["chosen"]` is None: the run then fails listing every candidate.
    With `placement.recipe_candidates`, each candidate is one chain (export, then its
    evaluation) that the placed runner runs as one flow run on that pool.

    export.adapters=separate: each candidate is the base build of that recipe (`export_base`,
    keyed as a manual run's, so shared by every fine-tune of this shape), this fine-tune's
    adapter file for it, and the evaluation of the two together; the recipes the separate form
    cannot build are left out, saying why. Judged against merged by the same rule. Placed, a
    candidate is two flow runs: the base build, then the adapter file chained with the
    evaluation (a chain feeds a step the output just before it, and the evaluation needs both).
    """
    from slmflow.errors import StageCheckError
    from slmflow.fidelity import compare, read_predictions

    search, max_drop = config.export.search, config.evaluate.max_accuracy_drop
    separate, left_out, lora = config.export.adapters == "separate", {}, None
    if separate:
        from slmflow.stages.export_separate import lora_of

        if base is None or adapter is None:
            raise TypeError("export.adapters=separate needs the base model and the fine-tune's adapter")
        kept, left_out = recipes.separate_candidates(search)
        for name, why in left_out.items():
            print(f"recipe search: {name} left out: export.adapters=separate cannot build it ({why})")
        search, lora = search.model_copy(update={"candidates": kept}), lora_of(adapter)
    merged_acc = merged_eval.meta["accuracy"]
    built: dict[str, tuple[ArtifactRef, ArtifactRef | None, ArtifactRef]] = {}
    placed = config.placement.recipe_candidates is not None
    evaluation_options = {"data": choice_data, "labels": config.data.labels,
                          "trust_remote_code": config.model.trust_remote_code}
    if chosen_on == "validation":
        evaluation_options["split"] = "validation"
    on = "" if chosen_on == "eval" else f"[{chosen_on}]"
    merged_rows = read_predictions(merged_eval)  # each candidate is compared with these rows

    def run_candidate(name: str) -> dict[str, Any]:
        onnx = onnx_adapter = evaluation = error = None
        cfg = recipes.candidate_config(config.export, name)
        evaluate = Step("evaluate", f"evaluate_exported[{name}]{on}", config.evaluate,
                        evaluation_options, feed="model", where="recipe_candidates")
        try:
            if separate:  # the base build, then (one chain) the adapter file and the two evaluated
                [onnx] = steps(Step("export_base", f"export_base[{name}]", cfg,
                                    {"base": base, "lora": lora}, where="recipe_candidates"))
                onnx_adapter, evaluation = steps(
                    Step("export_adapter", f"export_adapter[{name}]", cfg,
                         {"onnx_base": onnx, "adapter": adapter, "data": data},
                         where="recipe_candidates"),
                    replace(evaluate, named={**evaluation_options, "model": onnx}, feed="adapter"))
            else:
                export = Step("export", f"export[{name}]", cfg, {"merged": merged, "data": data},
                              where="recipe_candidates")
                if placed:  # one flow run on the candidates' pool
                    onnx, evaluation = steps(export, evaluate)
                else:
                    [onnx] = steps(export)
                    [evaluation] = steps(replace(evaluate, named=evaluate.inputs(onnx), feed=None))
            built[name] = (onnx, onnx_adapter, evaluation)
        except Exception as exc:  # noqa: BLE001 - a broken candidate is a finding, not the end
            error = f"{type(exc).__name__}: {exc}"
            print(f"recipe search: {name} failed: {error}")
        fidelity = None
        if evaluation is not None:  # how closely it answers like the merged model, same rows
            fidelity = compare(merged_rows, read_predictions(evaluation))
        return recipes.candidate_record(name, onnx, evaluation, merged_acc, max_drop, error,
                                        fidelity, search, onnx_adapter)

    parallel = search.max_parallel  # placed: each sub-run on a machine of its pool
    if parallel > 1 and not placed:  # here: this machine's memory decides how many run at once
        from slmflow.folders import describe_model, model_dir

        params = describe_model(model_dir(merged))["parameters"]
        parallel = recipes.parallel_limit(search, params, log=print)
    records = recipes.run_search(search, run_candidate, parallel)
    summary = recipes.search_summary(records, search.objective, merged_acc, max_drop, search,
                                     chosen_on, "separate" if separate else "merged", left_out)
    pick = summary["chosen"] or max(built, key=lambda n: built[n][2].meta["accuracy"], default=None)
    if pick is None:
        raise StageCheckError(recipes.failure_message(summary))
    print(f"recipe search: {summary['chosen'] or 'none within the gate'} "
          f"(objective {search.objective}, {len(built)}/{len(records)} candidates evaluated"
          + (", each base + adapter)" if separate else ")"))
    return Searched(*built[pick], summary, pick)


def run_plain(name: str, label: str, cfg: Any, store: Store, named: dict[str, Any]) -> tuple[ArtifactRef, bool]:
    """Run a stage as a plain function (no Prefect)."""
    from slmflow.stage import run_stage
    from slmflow.stages import STAGES

    def log(msg: str) -> None:
        print(f"[{label}] {msg}", file=sys.stderr, flush=True)

    ref = run_stage(STAGES[name], cfg, store, log=log, **named)
    log(f"{'cached' if ref.cached else 'done'}: {ref.uri}")
    return ref, ref.cached


def run_prefect_task(name: str, label: str, cfg: Any, store: Store, named: dict[str, Any]) -> tuple[ArtifactRef, bool]:
    """Run a stage as its Prefect task; results persist next to the stage store."""
    from tasks import stage_task

    state = stage_task(name, label, store)(name, cfg, store, named, return_state=True)
    ref = state.result()  # raises the stage's own error on failure
    return ref, state.name == "Cached" or ref.cached


def publish_artifacts(report: dict, path: Path) -> None:
    """The report's tables and Markdown as Prefect artifacts of the flow run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from slmflow.report import fidelity_table, model_table, render_markdown, stage_table

    create_table_artifact(model_table(report["models"]), key="slmflow-models",
                          description="Accuracy, latency and size of base, merged and exported")
    create_table_artifact(fidelity_table(report["sets"]), key="slmflow-fidelity",
                          description="Exported vs merged on every eval set: accuracy with 95% "
                          "interval, agreement, label KL, McNemar p")
    create_table_artifact(stage_table(report["stages"]), key="slmflow-stages",
                          description="Seconds per stage and whether it was cached")
    if report.get("export_search"):
        from slmflow.recipes import recipe_table

        create_table_artifact(recipe_table(report["export_search"]), key="slmflow-recipes",
                              description="Export recipe search: every candidate and its verdict")
    create_markdown_artifact(render_markdown(report, inline_images=True), key="slmflow-report",
                             description=f"Full report: {path}")


def apply_run_overrides(config: PipelineConfig, overrides: list[str] | None) -> PipelineConfig:
    """`config` with `dotted.key=value` overrides applied and the whole tree validated again."""
    if not overrides:
        return config
    from slmflow.configio import apply_overrides, build_config

    data = apply_overrides(config.model_dump(mode="json"), list(overrides))
    return build_config(data, source="overrides")


@flow(name="slmflow-pipeline", log_prints=True, validate_parameters=True)
def slmflow_pipeline(
    config: PipelineConfig = PipelineConfig(),  # noqa: B008
    overrides: list[str] | None = None,
    resolved_inputs: RunInputs | None = None,
) -> str:
    """Fine-tune, merge, export to ONNX and evaluate a small language model.

    Args:
        config: The whole run, as `slmflow show-config` prints it; each field says what it does.
        overrides: dotted.key=value changes applied on top of `config`, as `slmflow run --set`,
            e.g. ["finetune.max_steps=50", "export.precision=int8"]. Handy from the CLI, where
            `--param config=...` would replace the whole tree.
        resolved_inputs: the inputs `slmflow run` resolved already (used only while they match
            the config); not shown in deployment forms.
    """
    config = apply_run_overrides(config, overrides)
    run: Runner = run_prefect_task
    if config.placement.pools():  # some stages run as flow runs on their work pools
        from flows.placed import PlacedRunner

        run = PlacedRunner(config.placement, run_prefect_task)
    return str(run_pipeline(config, run, publish_artifacts, resolved_inputs))


if __name__ == "__main__":
    slmflow_pipeline()
