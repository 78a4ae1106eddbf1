"""Benchmark: int4 export recipes judged against the merged model, on the eval split and on the
shifted set (rows written in other frames and words than the training data).

For each recipe: size on disk, export seconds (0 when the export was in the cache already),
accuracy on both sets with its 95% interval, top-1 agreement with the merged model and the mean
label KL(merged ‖ exported) on both sets (`slmflow.fidelity`). Every export and evaluation is the
pipeline's own stage, content-keyed in the run's cache: a rerun measures nothing twice. The
baseline beside every row is plain int4 RTN (the builder's default, `int4_default`): its size
is the 1.0 of the size ratio.

Run as (after a default run, e.g. `slmflow run --no-prefect`):
    .venv/bin/python -m bench.recipes [--run runs/default] [--recipes int4_default,int4_hqq,...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import REPO, load_average, table, write_result

DEFAULT = ("int4_default,int4_rtn_b128,int4_k_quant,int4_k_quant_mixed,int4_hqq,int4_gptq,"
           "int4_sensitive,int8")
BASELINE = "int4_default"


def main(argv: list[str] | None = None) -> int:
    from slmflow.artifacts import read_verified
    from slmflow.config import EvaluateConfig, ExportConfig
    from slmflow.fidelity import compare, read_predictions
    from slmflow.recipes import candidate_config
    from slmflow.stage import run_stage
    from slmflow.stages import STAGES
    from slmflow.store import Store

    parser = argparse.ArgumentParser(prog="python -m bench.recipes")
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "default")
    parser.add_argument("--recipes", default=DEFAULT)
    args = parser.parse_args(argv)
    report = json.loads((args.run / "report.json").read_text())
    stages = report["stages"]

    def ref(label: str):
        found = read_verified(Path(stages[label]["uri"]))
        if found is None:
            raise SystemExit(f"{label}: {stages[label]['uri']} is missing or changed; run again")
        return found

    merged, store = ref("merge"), Store.at(Path(stages["merge"]["uri"]).parents[1])
    sets = {"eval": (ref("prepare_data"), ref("evaluate_merged"))}
    for label in stages:
        if label.startswith("prepare_data["):
            name = label[len("prepare_data["):-1]
            sets[name] = (ref(label), ref(f"evaluate_merged[{name}]"))
    evaluate_cfg = EvaluateConfig.model_validate(report["config"]["evaluate"])
    export_base = ExportConfig.model_validate(report["config"]["export"])
    labels = report["config"]["data"]["labels"]

    rows = []
    for recipe in args.recipes.split(","):
        load_before = load_average()
        started = time.perf_counter()
        onnx = run_stage(STAGES["export"], candidate_config(export_base, recipe), store,
                         merged=merged, data=sets["eval"][0])
        seconds = 0.0 if onnx.cached else time.perf_counter() - started
        row = {"recipe": recipe, "size_mb": onnx.meta["size_bytes"] / 2**20,
               "export_s": round(seconds, 1), "load_before": load_before}
        for name, (data, merged_eval) in sets.items():
            evaluation = run_stage(STAGES["evaluate"], evaluate_cfg, store, model=onnx, data=data,
                                   labels=labels, split="eval", trust_remote_code=False)
            fid = compare(read_predictions(merged_eval), read_predictions(evaluation))
            row[name] = {"accuracy": evaluation.meta["accuracy"],
                         "ci95": evaluation.meta["accuracy_ci95"],
                         "merged_accuracy": merged_eval.meta["accuracy"],
                         "agreement": fid["agreement"], "label_kl": fid["label_kl_mean"],
                         "mcnemar_p": fid["mcnemar_p"]}
        row["load_after"] = load_average()
        rows.append(row)
        print(f"{recipe}: {row['size_mb']:.1f} MB, export {seconds:.0f} s, "
              + ", ".join(f"{n} acc {row[n]['accuracy']:.4f} agree {row[n]['agreement']:.4f} "
                          f"KL {row[n]['label_kl']:.4f}" for n in sets), flush=True)

    base_size = next((r["size_mb"] for r in rows if r["recipe"] == BASELINE), None)
    header = ["recipe", "MB", "× RTN", "export s"]
    for name in sets:
        header += [f"{name} acc", f"{name} agree", f"{name} KL"]
    lines = []
    for r in rows:
        line = [r["recipe"], round(r["size_mb"], 1),
                round(r["size_mb"] / base_size, 2) if base_size else "", r["export_s"]]
        for name in sets:
            line += [round(r[name]["accuracy"], 4), round(r[name]["agreement"], 4),
                     round(r[name]["label_kl"], 4)]
        lines.append(line)
    merged_line = ", ".join(f"{n} {m.meta['accuracy']:.4f}" for n, (_, m) in sets.items())
    print(f"\nmerged model (reference): {merged_line}; load average {load_average()}")
    print(table(header, lines))
    path = write_result("recipes", {"run": str(args.run), "merged": {
        n: m.meta["accuracy"] for n, (_, m) in sets.items()}, "recipes": rows})
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
