"""Benchmark: LoRA vs QLoRA on the default model and data, side by side (a benchmark, not a test).

`finetune`: each method's fine-tune stage (the stage itself, the run's config with only
`finetune.method` and `max_steps` changed) in a fresh process of its own, one after the other,
with its peak memory (RSS and anonymous memory of the process, sampled every 0.1 s: model load
included) and seconds per step. `table`: the figures of finished runs (report.json) side by side:
seconds per step of their fine-tune, accuracy of the trained (QLoRA: 4-bit base + adapter),
merged and int4 models on every set, agreement of merged and int4 with the trained model, and the
gate. `merge-bases`: one QLoRA adapter merged into both bases, each against the trained model (the
merge's logit check, then every eval row's label scores: agreement, label KL, constrained
accuracy), without a whole run. Writes bench/results/qlora_*.json.

Run as (the base model and data come from the stage cache, built first if missing):
    .venv/bin/python -m bench.qlora finetune [--steps 10] [--set key=value ...]
    .venv/bin/python -m bench.qlora merge-bases --adapter CACHE/adapter/KEY [--rows N]
    .venv/bin/python -m bench.qlora table lora=runs/a qlora-original=runs/b qlora-dequantized=runs/c
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import REPO, PeakRss, load_average, table, write_result


def _inputs(overrides: list[str]):
    """The run's config (the embedded default plus `overrides`), its base model and data: the
    first two stages, cached after any run of it in this cache."""
    from slmflow.configio import apply_overrides, build_config
    from slmflow.preflight import validate_run
    from slmflow.stage import run_stage
    from slmflow.stages import STAGES

    config = build_config(apply_overrides({}, overrides), source="bench")
    inputs = validate_run(config)
    base = run_stage(STAGES["base_model"], config.model, inputs.store, source=inputs.model_source,
                     log=lambda m: None)
    data = run_stage(STAGES["prepare_data"], config.data, inputs.store, base=base,
                     train_source=inputs.train_source, eval_source=inputs.eval_source,
                     loss_on=config.finetune.loss_on, log=lambda m: None)
    return config, base, data


def one_finetune(method: str, steps: int, out: Path, overrides: list[str]) -> None:
    """(In its own process) the fine-tune stage of the config as `method`, into a temp store."""
    from slmflow.stage import run_stage
    from slmflow.stages import STAGES
    from slmflow.store import Store

    config, base, data = _inputs(overrides)
    cfg = config.finetune.model_copy(
        update={"method": method, "max_steps": steps, "checkpoint_every": steps})
    with tempfile.TemporaryDirectory(prefix="slmflow-bench-qlora-") as store:
        adapter = run_stage(STAGES["finetune"], cfg, Store.at(store), base=base, data=data,
                            log=lambda m: None)
    out.write_text(json.dumps(adapter.meta))


def finetune(steps: int, overrides: list[str]) -> None:
    _inputs(overrides)  # base model and data built (or found) before anything is measured
    results = {"steps": steps, "overrides": overrides, "load_average_before": load_average()}
    for method in ("lora", "qlora"):
        with tempfile.NamedTemporaryFile(suffix=".json") as meta_file:
            cmd = [sys.executable, "-m", "bench.qlora", "_one", "--method", method,
                   "--steps", str(steps), "--out", meta_file.name]
            cmd += [arg for o in overrides for arg in ("--set", o)]
            proc = subprocess.Popen(cmd, cwd=REPO)
            with PeakRss(proc.pid) as mem:
                code = proc.wait()
            if code:
                sys.exit(f"{method} fine-tune failed ({code})")
            meta = json.loads(Path(meta_file.name).read_text())
        results[method] = {"train_seconds": meta["train_seconds"],
                           "seconds_per_step": round(meta["train_seconds"] / steps, 3),
                           "final_loss": meta.get("final_loss"), "peak_mb": mem.peaks_mb(),
                           "load_average_after": load_average()}
    lora, qlora = results["lora"], results["qlora"]
    print(f"fine-tune, {steps} steps each, one process each (model load included in the memory); "
          f"load average {results['load_average_before']} before, {lora['load_average_after']} "
          f"after LoRA, {qlora['load_average_after']} after QLoRA")
    print(table(["", "s/step", "peak RSS MB", "peak anon MB"], [
        [m, results[m]["seconds_per_step"], results[m]["peak_mb"]["rss"], results[m]["peak_mb"]["anon"]]
        for m in ("lora", "qlora")]))
    print(f"QLoRA / LoRA: s/step {qlora['seconds_per_step'] / lora['seconds_per_step']:.2f}, "
          f"peak RSS {qlora['peak_mb']['rss'] / lora['peak_mb']['rss']:.2f}, "
          f"peak anon {qlora['peak_mb']['anon'] / lora['peak_mb']['anon']:.2f}")
    write_result("qlora_finetune", results)


def _acc(models: dict, who: str) -> float | str:
    return round(models[who]["accuracy"], 4) if who in models else "-"


def _agree(fidelity: dict, pair: str) -> float | str:
    return round(fidelity[pair]["agreement"], 4) if pair in fidelity else "-"


def summarize(report: dict) -> dict:
    """One run's row: its fine-tune's pace, the merge base, each set's accuracies and agreements."""
    training, merge = report["training"], report["merge"]
    sets = {}
    for name, s in report["sets"].items():
        sets[name] = {f"{who}_accuracy": _acc(s["models"], who) for who in ("trained", "merged", "exported")}
        sets[name] |= {"merged_agreement_with_trained": _agree(s["fidelity"], "merged_vs_trained"),
                       "exported_agreement_with_trained": _agree(s["fidelity"], "exported_vs_trained"),
                       "exported_agreement_with_merged": _agree(s["fidelity"], "exported_vs_merged")}
    return {"method": training.get("method"), "merge_base": merge.get("base_weights", "original"),
            # a resumed fine-tune's train_seconds cover the steps after its checkpoint only
            "seconds_per_step": round(training["train_seconds"] / max(
                1, training["steps"] - training.get("resumed_from_step", 0)), 3),
            "gate_passed": report["quality_gate"]["passed"],
            "gate_drop": report["quality_gate"]["drop"], "sets": sets,
            "merge_forms": merge.get("forms")}


def compare_runs(named: list[str]) -> None:
    rows, results = [], {}
    for item in named:
        name, _, folder = item.partition("=")
        results[name] = summarize(json.loads((Path(folder) / "report.json").read_text()))
    set_names = list(next(iter(results.values()))["sets"])
    for name, r in results.items():
        for set_name in set_names:
            s = r["sets"].get(set_name, {})
            rows.append([name, set_name, r["seconds_per_step"], s.get("trained_accuracy"),
                         s.get("merged_accuracy"), s.get("exported_accuracy"),
                         s.get("merged_agreement_with_trained"), s.get("exported_agreement_with_trained"),
                         "pass" if r["gate_passed"] else f"FAIL ({r['gate_drop']:.4f})"])
    print(table(["run", "set", "s/step", "trained", "merged", "int4", "merged=trained",
                 "int4=trained", "gate"], rows))
    for name, r in results.items():
        for form, f in (r["merge_forms"] or {}).items():
            print(f"{name}: {form} base + adapter vs trained: max |logit diff| "
                  f"{f['vs_trained']['max_logit_diff']:.3g}, same top token "
                  f"{f['vs_trained']['top1_agreement']:.1%}")
    write_result("qlora_table", results)


def merge_bases(adapter_dir: Path, rows_limit: int | None, overrides: list[str]) -> None:
    """Both merge bases of one QLoRA adapter against the trained model on the default data: the
    merge stage's own logit check (both forms), then every eval row's label scores (the scoring of
    the fidelity metrics and of constrained answers): top-label agreement with the trained model,
    label KL(trained ‖ merged), constrained accuracy. Cheaper than a run: no generation, no export."""
    from slmflow.artifacts import ArtifactRef
    from slmflow.fidelity import kl_divergence
    from slmflow.folders import model_dir, read_split
    from slmflow.generate import label_probabilities, torch_backend, trained_backend
    from slmflow.qlora import quantization_settings
    from slmflow.stage import Workspace
    from slmflow.stages import merge

    config, base, data = _inputs(["finetune.method=qlora", *overrides])
    quantization = quantization_settings(config.finetune)
    adapter = ArtifactRef(kind="adapter", uri=str(adapter_dir), sha256="-", key="-")
    labels = config.data.labels
    rows = read_split(data, "eval")[:rows_limit]
    before = load_average()
    scores, metas = {}, {}
    with tempfile.TemporaryDirectory(prefix="slmflow-bench-merge-") as tmp:
        trained = trained_backend(model_dir(base), adapter_dir, quantization)
        prompts = [trained.tokenizer(r["prompt"])["input_ids"] for r in rows]
        scores["trained"] = label_probabilities(trained, prompts, labels)
        del trained
        for form in ("original", "dequantized"):
            out = Path(tmp) / form
            out.mkdir()
            cfg = config.merge.model_copy(update={"base_weights": form, "check_prompts": 16})
            metas[form] = merge.build(cfg, Workspace(out, Path(tmp) / f"work-{form}", log=print),
                                      base=base, adapter=adapter, data=data, trust_remote_code=False,
                                      quantization=quantization)
            scores[form] = label_probabilities(torch_backend(out / "model"), prompts, labels)
    gold = [r["label"] for r in rows]

    def top(p: dict[str, float]) -> str:
        return max(p, key=p.get)

    table_rows, results = [], {"adapter": str(adapter_dir), "rows": len(rows), "load_average_before": before}
    for who in ("trained", "original", "dequantized"):
        got = scores[who]
        entry = {"accuracy_constrained": round(sum(top(p) == g for p, g in zip(got, gold)) / len(rows), 4),
                 "agreement_with_trained": round(sum(top(p) == top(t) for p, t in zip(got, scores["trained"]))
                                                 / len(rows), 4),
                 "label_kl_vs_trained": round(sum(kl_divergence(t, p) for p, t in zip(got, scores["trained"]))
                                              / len(rows), 6)}
        if who != "trained":
            entry["logits_vs_trained"] = metas["dequantized"]["forms"][who]["vs_trained"]
        results[who] = entry
        lv = entry.get("logits_vs_trained", {})
        table_rows.append([who if who == "trained" else f"merged into {who}", entry["accuracy_constrained"],
                           entry["agreement_with_trained"], entry["label_kl_vs_trained"],
                           lv.get("max_logit_diff", "-"), lv.get("top1_agreement", "-")])
    results["load_average_after"] = load_average()
    print(f"{len(rows)} eval rows, adapter {adapter_dir}; load average {before} before, "
          f"{results['load_average_after']} after")
    print(table(["model", "label acc", "label agreement w/ trained", "label KL vs trained",
                 "max |logit diff| (16 prompts)", "same top token"], table_rows))
    write_result("qlora_merge_bases", results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="s/step and peak memory of each method's fine-tune")
    ft.add_argument("--steps", type=int, default=10)
    one = sub.add_parser("_one")
    one.add_argument("--method")
    one.add_argument("--steps", type=int)
    one.add_argument("--out")
    for p in (ft, one):
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       help="config override, as slmflow run --set (default: the embedded run)")
    mb = sub.add_parser("merge-bases", help="both merge bases of a QLoRA adapter vs the trained model")
    mb.add_argument("--adapter", required=True, help="a QLoRA adapter folder (or a checkpoint of one)")
    mb.add_argument("--rows", type=int, default=None, help="first N eval rows (default: all)")
    mb.add_argument("--set", dest="overrides", action="append", default=[])
    tab = sub.add_parser("table", help="finished runs side by side")
    tab.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    args = parser.parse_args()
    if args.command == "finetune":
        finetune(args.steps, args.overrides)
    elif args.command == "merge-bases":
        merge_bases(Path(args.adapter), args.rows, args.overrides)
    elif args.command == "_one":
        one_finetune(args.method, args.steps, Path(args.out), args.overrides)
    else:
        compare_runs(args.runs)


if __name__ == "__main__":
    main()
