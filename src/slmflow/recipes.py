"""Pick the export recipe by measurement (`export.recipe: auto`).

Every candidate recipe is exported and evaluated (on the validation split when the data has one,
else on the quality gate's set) with the ordinary export and
evaluation stages (so each is its own content-keyed result, shared with a manual run of the same
recipe); the smallest (or fastest) candidate within the quality gate wins. A candidate the builder
breaks, or that fails to load or run, is recorded as failed with its error and the search goes on.

With `export.adapters: separate` a candidate is the separate form: the recipe's base build
(`export_base`, shared by every fine-tune of that LoRA shape) with this fine-tune's adapter file,
evaluated together, its size the two's; the recipes that form cannot build (`separate_refusal`)
are left out of the default list and refused with the config when named.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from html import escape
from typing import Any

from slmflow.artifacts import ArtifactRef
from slmflow.config import SEPARATE_REFUSALS, ExportConfig, RecipeSearchConfig, SensitivityConfig

# How each named recipe sets the builder (fields of ExportConfig); unset fields keep the
# builder's defaults, so int4_k_quant is exactly the manual default's export.
RECIPES: dict[str, dict[str, Any]] = {
    "int4_rtn_b128": {"precision": "int4", "algo_config": "rtn", "block_size": 128},
    "int4_rtn_b64": {"precision": "int4", "algo_config": "rtn", "block_size": 64},
    "int4_rtn_b32": {"precision": "int4", "algo_config": "rtn", "block_size": 32},
    "int4_rtn_b16": {"precision": "int4", "algo_config": "rtn", "block_size": 16},
    "int4_default": {"precision": "int4", "algo_config": "default"},
    "int4_hqq": {"precision": "int4", "quantizer": "hqq", "block_size": 32},
    "int4_gptq": {"precision": "int4", "quantizer": "gptq", "block_size": 32},
    "int4_k_quant": {"precision": "int4", "algo_config": "k_quant"},
    "int4_k_quant_last": {"precision": "int4", "algo_config": "k_quant_last"},
    "int4_sensitive": {"precision": "int4", "algo_config": "default",
                       "sensitivity": {"int8_budget": 0.25, "rows": 16}},
    "int4_k_quant_mixed": {"precision": "int4", "algo_config": "k_quant_mixed"},
    "int8": {"precision": "int8", "algo_config": "default"},
    "fp16": {"precision": "fp16", "algo_config": "default"},
}
BUILDER_DEFAULT = "int4_default"


def candidate_config(cfg: ExportConfig, name: str) -> ExportConfig:
    """The manual export config of recipe `name` (execution provider and extras kept)."""
    recipe = dict(RECIPES[name])
    recipe["sensitivity"] = SensitivityConfig(**recipe.get("sensitivity", {}))
    return cfg.model_copy(update={
        "recipe": "manual", "search": RecipeSearchConfig(), "block_size": None,
        "matmul_mixed_precision": None, "quantizer": "builder", **recipe,
    })


def separate_refusal(name: str) -> str | None:
    """Why `export.adapters: separate` cannot build recipe `name` (None: it can)."""
    return SEPARATE_REFUSALS.get(name)


def separate_candidates(cfg: RecipeSearchConfig) -> tuple[list[str], dict[str, str]]:
    """(the candidates the separate form builds, {left out: why}). Only the default list can
    hold one it cannot build: a list naming one is refused with the config."""
    left_out = {n: why for n in cfg.candidates if (why := separate_refusal(n))}
    return [n for n in cfg.candidates if n not in left_out], left_out


def gate_passed(merged_accuracy: float, accuracy: float, max_drop: float) -> bool:
    """The report's quality gate: exported at most `max_drop` below merged."""
    return merged_accuracy - accuracy <= max_drop + 1e-9


def candidate_record(name: str, onnx: ArtifactRef | None, evaluation: ArtifactRef | None,
                     merged_accuracy: float, max_drop: float, error: str | None = None,
                     fidelity: dict[str, Any] | None = None,
                     floors: RecipeSearchConfig | None = None,
                     adapter: ArtifactRef | None = None) -> dict:
    """One row of the search: what was built, how it scored (and how closely it answers like
    the merged model: `fidelity`, from slmflow.fidelity.compare), and the verdict. Separate
    form: `onnx` is the base build and `adapter` the fine-tune's file; the size is both."""
    record: dict[str, Any] = {"recipe": name, **RECIPES[name], "verdict": "failed", "error": error}
    if onnx is not None:
        record.update(size_bytes=onnx.meta.get("size_bytes"), onnx_key=onnx.key, onnx_uri=onnx.uri)
    if onnx is not None and adapter is not None:
        base, extra = onnx.meta["size_bytes"], adapter.meta["size_bytes"]
        record.update(size_bytes=base + extra, base_bytes=base, adapter_bytes=extra,
                      adapter_key=adapter.key, adapter_uri=adapter.uri)
    if evaluation is not None:
        m = evaluation.meta
        record.update(accuracy=m["accuracy"], macro_f1=m["macro_f1"],
                      latency_ms_p50=m["latency_ms_p50"], latency_ms_p95=m["latency_ms_p95"],
                      evaluation_key=evaluation.key)
        if fidelity is not None:
            record.update(agreement=fidelity["agreement"], label_kl=fidelity["label_kl_mean"])
        record["verdict"] = verdict(record, merged_accuracy, max_drop, floors)
    return record


def verdict(record: dict[str, Any], merged_accuracy: float, max_drop: float,
            floors: RecipeSearchConfig | None) -> str:
    """passed, below gate (accuracy), or below fidelity floor (agreement / label KL)."""
    if not gate_passed(merged_accuracy, record["accuracy"], max_drop):
        return "below gate"
    if floors is None:
        return "passed"
    agreement, kl = record.get("agreement"), record.get("label_kl")
    if floors.min_agreement is not None and (agreement is None or agreement < floors.min_agreement):
        return "below fidelity floor"
    if floors.max_label_kl is not None and (kl is None or kl > floors.max_label_kl):
        return "below fidelity floor"
    return "passed"


def choose(records: list[dict], objective: str) -> dict | None:
    """The smallest (or fastest) candidate that passed; ties go to the more accurate."""
    passed = [r for r in records if r["verdict"] == "passed"]
    if not passed:
        return None
    metric = "size_bytes" if objective == "smallest" else "latency_ms_p50"
    return min(passed, key=lambda r: (r[metric], -r["accuracy"], r["recipe"]))


def pareto_front(records: list[dict], metric: str = "accuracy") -> list[str]:
    """Recipes no other candidate beats on both size (smaller) and `metric` (accuracy: higher;
    label_kl: lower)."""
    sign = -1 if metric == "accuracy" else 1  # compare as "lower is better"
    scored = [r for r in records if r.get(metric) is not None and r.get("size_bytes")]
    front = []
    for r in scored:
        dominated = any(
            o["size_bytes"] <= r["size_bytes"] and sign * o[metric] <= sign * r[metric]
            and (o["size_bytes"] < r["size_bytes"] or sign * o[metric] < sign * r[metric])
            for o in scored)
        if not dominated:
            front.append(r["recipe"])
    return sorted(front, key=lambda n: next(r["size_bytes"] for r in scored if r["recipe"] == n))


def run_search(
    cfg: RecipeSearchConfig,
    run_candidate: Callable[[str], dict],
    parallel: int,
) -> list[dict]:
    """Run every candidate (`parallel` at a time), in the order the config lists them."""
    if parallel <= 1:
        return [run_candidate(name) for name in cfg.candidates]
    from slmflow import lifeline

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="recipe") as pool:
        # each thread runs in a copy of this context, so Prefect's flow run context goes along
        futures = [pool.submit(contextvars.copy_context().run, run_candidate, name)
                   for name in cfg.candidates]
        try:
            return [f.result() for f in futures]
        except BaseException:  # Ctrl-C or SIGTERM: no new candidate, the running ones' builders
            pool.shutdown(wait=False, cancel_futures=True)  # stopped, so the threads end now
            lifeline.stop_all()
            raise


def parallel_limit(cfg: RecipeSearchConfig, params: int, log: Callable[[str], None] = print) -> int:
    """`max_parallel`, lowered so that concurrent exports fit in the memory available now."""
    from slmflow.resources import available_memory_bytes, estimate_export

    if cfg.max_parallel <= 1:
        return 1
    need = estimate_export(params, "fp16")[0]
    fits = max(1, available_memory_bytes() // max(need, 1))
    if fits < cfg.max_parallel:
        log(f"recipe search: {fits} candidate(s) at a time, not {cfg.max_parallel}: each export "
            f"needs about {need / 2**30:.1f} GiB")
    return int(min(cfg.max_parallel, fits))


def search_summary(records: list[dict], objective: str, merged_accuracy: float,
                   max_drop: float, floors: RecipeSearchConfig | None = None,
                   chosen_on: str = "eval", form: str = "merged",
                   left_out: dict[str, str] | None = None) -> dict[str, Any]:
    """The search's record in the report; `chosen_on`: the set the candidates were judged on;
    `form`: merged (one model each) or separate (a base build + this fine-tune's adapter file
    each, `left_out` the recipes that form cannot build, with why)."""
    chosen = choose(records, objective)
    builder_default = next((r for r in records if r["recipe"] == BUILDER_DEFAULT), None)
    return {
        "form": form,
        "left_out": left_out or {},
        "objective": objective,
        "merged_accuracy": merged_accuracy,
        "min_accuracy": round(merged_accuracy - max_drop, 6),
        "min_agreement": floors.min_agreement if floors else None,
        "max_label_kl": floors.max_label_kl if floors else None,
        "chosen": chosen["recipe"] if chosen else None,
        "builder_default": builder_default and {
            k: builder_default.get(k) for k in ("verdict", "accuracy", "size_bytes", "error")},
        "pareto_front": pareto_front(records),
        "pareto_front_kl": pareto_front(records, "label_kl"),
        "chosen_on": chosen_on,
        "candidates": records,
    }


def _row(r: dict[str, Any], fidelity: bool) -> str:
    if "accuracy" not in r:
        return f"{r['recipe']} failed ({(r.get('error') or '')[:80]})"
    text = f"{r['recipe']} {r['accuracy']:.4f}"
    if fidelity and r.get("agreement") is not None:  # shown when floors decide
        text += f" (agreement {r['agreement']:.3f}, KL {r['label_kl']:.4f})"
    return text


def _floors(summary: dict[str, Any]) -> str:
    """The search's fidelity floors in words ("" when none is set)."""
    floors = [f"agreement >= {summary['min_agreement']}" if summary.get("min_agreement") is not None else "",
              f"label KL <= {summary['max_label_kl']}" if summary.get("max_label_kl") is not None else ""]
    return " and ".join(f for f in floors if f)


def failure_message(summary: dict[str, Any]) -> str:
    floors_text = _floors(summary)
    rows = "; ".join(_row(r, bool(floors_text)) for r in summary["candidates"])
    form = (" (each a base build + this fine-tune's adapter file)"
            if summary.get("form") == "separate" else "")
    return (f"recipe search: no candidate{form} holds the quality gate (accuracy >= "
            f"{summary['min_accuracy']:.4f} = merged {summary['merged_accuracy']:.4f} - "
            f"evaluate.max_accuracy_drop)" + (f" and {floors_text} (export.search)" if floors_text else "")
            + f": {rows}; add int8/fp16 to export.search.candidates or allow a larger "
            "evaluate.max_accuracy_drop" + (" or looser export.search floors" if floors_text else ""))


def recipe_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The search as table rows (report and Prefect artifact)."""
    rows = []
    for r in summary["candidates"]:
        verdict = r["verdict"]
        if r["recipe"] == summary["chosen"]:
            verdict = (f"chosen ({summary['objective']} within the gate"
                       + (" and fidelity floors)" if _floors(summary) else ")"))
        elif r["verdict"] == "failed":
            verdict = f"failed: {(r.get('error') or '')[:120]}"
        sizes = {"size_mb": round(r["size_bytes"] / 2**20, 1) if r.get("size_bytes") else ""}
        if summary.get("form") == "separate":  # the size is base + adapter: both shown
            sizes.update({f"{part}_mb": round(r[f"{part}_bytes"] / 2**20, 2)
                          if r.get(f"{part}_bytes") else "" for part in ("base", "adapter")})
        rows.append({
            "recipe": r["recipe"],
            **sizes,
            "accuracy": round(r["accuracy"], 4) if "accuracy" in r else "",
            "macro_f1": round(r["macro_f1"], 4) if "macro_f1" in r else "",
            "agreement": round(r["agreement"], 4) if r.get("agreement") is not None else "",
            "label_kl": round(r["label_kl"], 4) if r.get("label_kl") is not None else "",
            "p50_ms": r.get("latency_ms_p50", ""),
            "p95_ms": r.get("latency_ms_p95", ""),
            "pareto": "yes" if r["recipe"] in summary["pareto_front"] else "",
            "verdict": verdict,
        })
    return rows


def _svg_scale(summary: dict[str, Any], scored: list[dict], metric: str) -> tuple:
    """(x range in MB, y range, Pareto front, axis name, dashed threshold line or None)."""
    sizes = [r["size_bytes"] / 2**20 for r in scored]
    values = [r[metric] for r in scored]
    if metric == "accuracy":
        values.append(summary["min_accuracy"])
        y = (max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.03))
        front, name = summary["pareto_front"], "accuracy"
        line = (summary["min_accuracy"], f"gate {summary['min_accuracy']:.3f}")
    else:  # KL: 0 is perfect fidelity, at the top
        y = (max(values) * 1.1, 0.0)
        front, name = summary.get("pareto_front_kl") or [], "label KL(merged ‖ candidate)"
        floor = summary.get("max_label_kl")
        line = (floor, f"floor {floor}") if floor is not None else None
    y = y if y[1] != y[0] else (y[0], y[0] + 0.1)
    return (min(sizes) * 0.85, max(sizes) * 1.08), y, front, name, line


def search_svg(summary: dict[str, Any], metric: str = "accuracy", width: int = 620,
               height: int = 340) -> str:
    """Size against accuracy (or label KL to the merged model): every scored candidate, the
    gate (or the KL floor), the Pareto front, the choice."""
    scored = [r for r in summary["candidates"] if r.get(metric) is not None and r.get("size_bytes")]
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">'
    if not scored:
        return head + '<text x="8" y="24">no candidate was evaluated</text></svg>'
    left, right, top, bottom = 56, 150, 24, 40
    (x0, x1), (y0, y1), front_names, name, line = _svg_scale(summary, scored, metric)

    def px(size_mb: float) -> float:
        return left + (width - left - right) * (size_mb - x0) / (x1 - x0)

    def py(value: float) -> float:
        return top + (height - top - bottom) * (1 - (value - y0) / (y1 - y0))

    on, mid = summary.get("chosen_on", "eval"), (top + height - bottom) / 2
    parts = [head, '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{left}" y="14" font-size="12">size on disk vs {escape(name)} on {escape(on)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#444"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#444"/>',
             (f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">'
             f'{"base + adapter size" if summary.get("form") == "separate" else "size"} (MB)</text>'),
             f'<text x="12" y="{mid}" transform="rotate(-90 12 {mid})" text-anchor="middle">{"accuracy" if metric == "accuracy" else "label KL"}</text>']
    for i in range(5):
        value, size = y0 + (y1 - y0) * i / 4, x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{left - 4}" y="{py(value) + 4:.1f}" text-anchor="end">{value:.2f}</text>')
        parts.append(f'<text x="{px(size):.1f}" y="{height - bottom + 14}" text-anchor="middle">{size:.0f}</text>')
    if line is not None:
        ly = py(line[0])
        parts.append(f'<line x1="{left}" y1="{ly:.1f}" x2="{width - right}" y2="{ly:.1f}" stroke="#d62728" stroke-dasharray="5,4"/>')
        parts.append(f'<text x="{left + 4}" y="{ly - 4:.1f}" fill="#d62728">{escape(line[1])}</text>')
    by_name = {r["recipe"]: r for r in scored}
    front = [by_name[n] for n in front_names if n in by_name]
    if len(front) > 1:
        points = " ".join(f"{px(r['size_bytes'] / 2**20):.1f},{py(r[metric]):.1f}" for r in front)
        parts.append(f'<polyline points="{points}" fill="none" stroke="#2ca02c" stroke-width="1.5"/>')
    for r in scored:
        x, y = px(r["size_bytes"] / 2**20), py(r[metric])
        color = "#1f77b4" if r["verdict"] == "passed" else "#999"
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>')
        parts.append(f'<text x="{x + 6:.1f}" y="{y - 5:.1f}" font-size="9">{escape(r["recipe"])}</text>')
        if r["recipe"] == summary["chosen"]:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="9" fill="none" stroke="#ff7f0e" stroke-width="2.5"/>')
    parts += _svg_legend(summary, width - right + 10, top)
    return "".join(parts) + "</svg>"


def _svg_legend(summary: dict[str, Any], x: float, top: float) -> list[str]:
    parts = []
    for i, (color, label) in enumerate((("#ff7f0e", "chosen"), ("#2ca02c", "Pareto front"),
                                        ("#1f77b4", "passed"), ("#999", "not passed"))):
        y = top + 30 + 16 * i
        parts.append(f'<rect x="{x}" y="{y - 8}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{x + 14}" y="{y + 1}">{label}</text>')
    failed = [r["recipe"] for r in summary["candidates"] if r["verdict"] == "failed"]
    if failed:
        parts.append(f'<text x="{x}" y="{top + 120}">failed:</text>')
        for i, name in enumerate(failed):
            parts.append(f'<text x="{x}" y="{top + 134 + 12 * i}" font-size="9">{escape(name)}</text>')
    return parts
