"""The run report: report.json, report.md and its two pictures (plain SVG, no plotting library)."""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path
from typing import Any

from slmflow.artifacts import write_atomic
from slmflow.recipes import gate_passed, recipe_table, search_svg

MODEL_ROWS = (("base", "Base"), ("trained", "Trained (4-bit base + adapter)"),
              ("merged", "Merged (PyTorch fp32)"), ("exported", "Exported (ONNX)"),
              ("exported_merged", "Exported, adapter merged (ONNX)"))


def loss_curve_svg(history: list[dict[str, float]], width: int = 560, height: int = 260) -> str:
    """A line chart of training loss against step."""
    pad = 40
    if not history:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40"><text x="8" y="24">no loss recorded</text></svg>'
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    x0, x1 = min(steps), max(steps) or 1
    y0, y1 = 0.0, max(losses) * 1.05 or 1.0

    def xy(s: float, v: float) -> str:
        x = pad + (s - x0) / max(x1 - x0, 1) * (width - 2 * pad)
        y = height - pad - (v - y0) / (y1 - y0) * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    points = " ".join(xy(s, v) for s, v in zip(steps, losses))
    ticks = "".join(
        f'<text x="{pad - 6}" y="{height - pad - f * (height - 2 * pad):.0f}" text-anchor="end" '
        f'font-size="10">{y1 * f:.2f}</text>'
        for f in (0, 0.5, 1)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
        f'<rect width="100%" height="100%" fill="white"/>'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#444"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#444"/>{ticks}'
        f'<text x="{pad}" y="{height - pad + 14}" font-size="10">{x0}</text>'
        f'<text x="{width - pad}" y="{height - pad + 14}" font-size="10" text-anchor="end">{x1}</text>'
        f'<text x="{width / 2}" y="{height - 8}" font-size="12" text-anchor="middle">step</text>'
        f'<text x="{width / 2}" y="18" font-size="13" text-anchor="middle">training loss</text>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{points}"/></svg>'
    )


def confusion_svg(matrix: dict[str, dict[str, int]], title: str, cell: int = 56) -> str:
    """A heat map of the confusion matrix: rows are the true label, columns the answer."""
    rows = list(matrix)
    cols = list(next(iter(matrix.values())))
    left, top = 90, 60
    width, height = left + cell * len(cols) + 10, top + cell * len(rows) + 30
    peak = max((v for r in matrix.values() for v in r.values()), default=1) or 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{width / 2}" y="16" font-size="13" text-anchor="middle">{escape(title)}</text>',
    ]
    for j, c in enumerate(cols):
        parts.append(f'<text x="{left + cell * j + cell / 2}" y="{top - 8}" font-size="11" text-anchor="middle">{escape(c)}</text>')
    for i, r in enumerate(rows):
        parts.append(f'<text x="{left - 6}" y="{top + cell * i + cell / 2 + 4}" font-size="11" text-anchor="end">{escape(r)}</text>')
        for j, c in enumerate(cols):
            v = matrix[r][c]
            shade = int(255 - 200 * v / peak)
            fg = "white" if v / peak > 0.6 else "black"
            x, y = left + cell * j, top + cell * i
            parts.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="rgb({shade},{shade},255)" stroke="#ccc"/>')
            parts.append(f'<text x="{x + cell / 2}" y="{y + cell / 2 + 4}" font-size="12" text-anchor="middle" fill="{fg}">{v}</text>')
    parts.append(f'<text x="{left + cell * len(cols) / 2}" y="{height - 8}" font-size="11" text-anchor="middle">answer</text></svg>')
    return "".join(parts)


def model_table(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluated model: the figures the report and the Prefect artifact show."""
    table = []
    for key, name in MODEL_ROWS:
        m = models.get(key)
        if not m:
            continue
        if m.get("model_kind") == "onnx_base+adapter":
            name = "Exported (ONNX base + adapter file)"
        table.append({
            "model": name,
            "accuracy": round(m["accuracy"], 4),
            "accuracy_constrained": (round(m["accuracy_constrained"], 4)
                                     if "accuracy_constrained" in m else "-"),
            "macro_f1": round(m["macro_f1"], 4),
            "p50_ms": m["latency_ms_p50"],
            "p95_ms": m["latency_ms_p95"],
            "tokens_per_s": m["tokens_per_second"],
            "size_mb": round(m["size_bytes"] / 1e6, 1) if m.get("size_bytes") is not None else "-",
            # evaluate.max_examples: say the rows are a sample, and of how many
            "n": f"{m['n']} of {m['sample']['of']} (sample)" if m.get("sample") else m["n"],
        })
    return table


def stage_table(stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"stage": k, "seconds": round(v["seconds"], 2), "cached": v["cached"]} for k, v in stages.items()]


def _md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines)


def _image(alt: str, file: str, svg: str, inline: bool) -> str:
    """A Markdown image: the SVG file beside report.md, or the SVG itself as a data URI (for the
    Prefect artifact, which has no folder to point into)."""
    if not inline:
        return f"![{alt}]({file})"
    return f"![{alt}](data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()})"


def _num(value: Any, digits: int = 4) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def _search_section(search: dict[str, Any] | None, inline: bool) -> list[str]:
    """The recipe search: why this export recipe (only for export.recipe: auto)."""
    if not search:
        return []
    default = search.get("builder_default")
    floors = [f"agreement with merged ≥ {search['min_agreement']}"
              if search.get("min_agreement") is not None else "",
              f"label KL ≤ {search['max_label_kl']}" if search.get("max_label_kl") is not None else ""]
    floors_text = " and ".join(f for f in floors if f)
    why = (f"Judged on {search.get('chosen_on', 'eval')}: candidates must reach accuracy "
           f"{search['min_accuracy']:.4f} (merged "
           f"{search['merged_accuracy']:.4f} minus evaluate.max_accuracy_drop)"
           + (f" and {floors_text}" if floors_text else "") + "; chosen: "
           f"**{search['chosen'] or 'none'}**, the {search['objective']} of those that do.")
    if default:
        acc = default.get("accuracy")
        why += (" The builder's default (int4_default: RTN, block 32) "
                + (f"scored {acc:.4f} ({default['verdict']})." if acc is not None
                   else f"failed: {default.get('error')}."))
    if search.get("form") == "separate":
        why = ("Candidates in the separate form (export.adapters: separate): each recipe's base "
               "build (shared by every fine-tune of this LoRA shape) with this fine-tune's "
               "adapter file, evaluated together; size = base + adapter. " + why)
        left_out = search.get("left_out") or {}
        if left_out:
            why += " Left out (the separate form cannot build them): " + "; ".join(
                f"{name}: {reason}" for name, reason in left_out.items()) + "."
    images = [_image("recipe search", "recipe_search.svg", search_svg(search), inline)]
    if search.get("pareto_front_kl"):
        images.append(_image("recipe search, label KL", "recipe_search_kl.svg",
                             search_svg(search, "label_kl"), inline))
    return ["## Export recipe search\n\n" + why + "\n\n" + _md_table(recipe_table(search)), *images]


def _gate_line(gate: dict[str, Any]) -> str:
    verdict = "passed" if gate["passed"] else "FAILED"
    line = (f"Quality gate {verdict} on {gate.get('set', 'eval')} ({gate.get('answers', 'free')} "
            f"answers): exported accuracy "
            f"{gate['exported_accuracy']:.4f} vs merged {gate['merged_accuracy']:.4f} (drop "
            f"{gate['drop']:.4f}, allowed {gate['max_accuracy_drop']}).")
    if "mcnemar_p" in gate:
        line += (f" Agreement {gate['agreement']:.4f}; McNemar p = {gate['mcnemar_p']:.3f}: the "
                 + ("difference is within noise on this many rows." if gate["within_noise"]
                    else "difference is beyond noise."))
    return line


def selection(gate_set: str, set_names: list[str], search: dict[str, Any] | None) -> dict[str, Any]:
    """Which rows made which choice, and which figures no choice has seen."""
    chosen_on = search.get("chosen_on", gate_set) if search else None
    return {"trained_on": "the train split", "gate_judged_on": gate_set,
            "recipe_chosen_on": chosen_on,
            "untouched_sets": [n for n in set_names if n not in (gate_set, chosen_on)]}


def _selection_line(sel: dict[str, Any] | None) -> str:
    if not sel:
        return ""
    chosen = (f"the export recipe was chosen on {sel['recipe_chosen_on']} and "
              if sel["recipe_chosen_on"] else "")
    untouched = ", ".join(sel["untouched_sets"]) or "none"
    return (f"Which rows chose what: the adapter trained on {sel['trained_on']}; {chosen}the "
            f"gate judged on {sel['gate_judged_on']}. Figures on {untouched} were used for no "
            "choice: quote those.")


def render_markdown(report: dict[str, Any], inline_images: bool = False) -> str:
    gate = report["quality_gate"]
    exported = report["models"].get("exported")
    confusion = _image("confusion", "confusion_exported.svg", confusion_svg(
        exported["confusion"], "exported model: true label vs answer") if exported else "",
        inline_images)
    loss = _image("loss curve", "loss_curve.svg", loss_curve_svg(
        report["training"].get("loss_curve") or []), inline_images)
    return "\n\n".join([
        f"# slmflow report: {report['name']}",
        f"Exported model: `{report['exported_model_dir']}`",
        "## Models on the eval split\n\n" + _md_table(model_table(report["models"])),
        _gate_line(gate),
        _selection_line(report.get("selection")),
        *_fidelity_section(report),
        *_search_section(report.get("export_search"), inline_images),
        "## Confusion matrix (exported)\n\n" + confusion,
        _training_section(report["training"], loss),
        _merge_section(report["merge"]),
        "## Stages\n\n" + _md_table(stage_table(report["stages"])),
    ]) + "\n"


def _merge_section(merge: dict[str, Any]) -> str:
    forms = merge.get("forms")
    if not forms:
        return f"## Merge\n\nmax |logit diff| merged vs base+adapter: {merge.get('max_logit_diff')}"
    rows = [{"merged into": form + (" (written)" if form == merge.get("base_weights") else ""),
             "max_logit_diff_vs_trained": _num(f["vs_trained"]["max_logit_diff"], 6),
             "mean_logit_diff_vs_trained": _num(f["vs_trained"]["mean_logit_diff"], 6),
             "same_top_token": _num(f["vs_trained"]["top1_agreement"]),
             "merge_exactness": _num(f["merge_exactness"], 8)} for form, f in forms.items()]
    return ("## Merge\n\nQLoRA: both full-precision bases with the adapter merged, against the "
            "trained model (4-bit base + adapter) on the check prompts' logits (merge_exactness: "
            "merged vs the same base with the adapter unmerged).\n\n" + _md_table(rows))


def trained_fidelity_table(sets: dict[str, Any]) -> list[dict[str, Any]]:
    """Per eval set (QLoRA): how the merged and exported models answer against the trained one."""
    rows = []
    for name, summary in sets.items():
        for who in ("merged", "exported"):
            fid = summary["fidelity"].get(f"{who}_vs_trained")
            if fid:
                rows.append({"set": name, "model": who, "rows": fid["rows"],
                             "agreement": round(fid["agreement"], 4),
                             "label_kl_mean": _num(fid["label_kl_mean"], 5),
                             "mcnemar_p": round(fid["mcnemar_p"], 4)})
    return rows


def training(config, adapter, loss_curve: list[dict[str, Any]]) -> dict[str, Any]:
    """The fine-tune's figures; for a given adapter (finetune.adapter_path), where it came from
    (the path from this run's config: the cached stage is keyed by content, not by path)."""
    meta = dict(adapter.meta)
    if "given" in meta:
        meta["given"] = {"adapter_path": config.finetune.adapter_path, **meta["given"]}
    return {**meta, "loss_curve": loss_curve}


def _training_section(training: dict[str, Any], loss: str) -> str:
    given = training.get("given")
    if given:
        return (f"## Fine-tune\n\nNo training: the adapter was given (finetune.adapter_path "
                f"`{given['adapter_path']}`, sha256 {given['sha256']}): r {given.get('r')}, "
                f"alpha {given.get('alpha')}, target modules {given.get('target_modules')}, "
                f"trained on {given.get('trained_on_base')}.")
    return (f"## Training\n\n{training.get('steps')} steps, final loss "
            f"{_num(training.get('final_loss'))}, {training.get('tokens_per_second')} "
            f"tokens/s; world size {training.get('world_size', 1)}, global batch "
            f"{training.get('global_batch', '?')} (batch_size × gradient_accumulation_steps "
            "× world size).\n\n" + loss)


def build_report(
    config, data, adapter, merged, onnx, sets, timings, total_seconds, exported_dir=None,
    search=None,
) -> dict[str, Any]:
    """The report of one run, from the stage references (all small, all JSON).

    `sets`: eval set name ("eval", then the extra sets) → model name → evaluation reference.
    """
    from slmflow import __version__
    from slmflow.fidelity import summarize_set

    summaries = {name: summarize_set(evals) for name, evals in sets.items()}
    gate_set = config.evaluate.gate_set
    judged = summaries[gate_set]
    gated = "accuracy_constrained" if config.evaluate.constrained else "accuracy"
    merged_acc = judged["models"]["merged"].get(gated, judged["models"]["merged"]["accuracy"])
    exported_acc = judged["models"]["exported"].get(gated, judged["models"]["exported"]["accuracy"])
    fid = judged["fidelity"]["exported_vs_merged"]
    loss_file = Path(adapter.uri) / "train_log.json"
    return {
        "name": Path(config.output_dir).name,
        "slmflow_version": __version__,
        "models": summaries["eval"]["models"],
        "sets": summaries,
        "exported_model_dir": str(exported_dir or onnx.uri),
        "merged_model_dir": str(Path(merged.uri) / "model"),
        "adapter_dir": adapter.uri,
        "quality_gate": {
            "set": gate_set,
            "answers": "constrained" if config.evaluate.constrained else "free",
            "merged_accuracy": merged_acc,
            "exported_accuracy": exported_acc,
            "drop": round(merged_acc - exported_acc, 6),
            "max_accuracy_drop": config.evaluate.max_accuracy_drop,
            "passed": gate_passed(merged_acc, exported_acc, config.evaluate.max_accuracy_drop),
            "agreement": fid["agreement"],
            "mcnemar_p": fid["mcnemar_p"],
            "within_noise": fid["difference_within_noise"],
        },
        "data": data.meta,
        "training": training(config, adapter, json.loads(loss_file.read_text())),
        "merge": merged.meta,
        "export": onnx.meta,
        "export_search": search,
        "selection": selection(gate_set, list(sets), search),
        "stages": timings,
        "total_seconds": round(total_seconds, 2),
        "config": config.model_dump(mode="json"),
    }


def _accuracy_with_interval(metrics: dict[str, Any]) -> str:
    lo, hi = metrics.get("accuracy_ci95") or (None, None)
    return f"{metrics['accuracy']:.4f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")


def fidelity_table(sets: dict[str, Any]) -> list[dict[str, Any]]:
    """Per eval set: both models' accuracy with its 95% interval, and how the exported model
    answers against the merged one."""
    rows = []
    for name, summary in sets.items():
        models, fid = summary["models"], summary["fidelity"].get("exported_vs_merged")
        if not fid:
            continue
        rows.append({
            "set": name, "rows": fid["rows"], "merged": _accuracy_with_interval(models["merged"]),
            "exported": _accuracy_with_interval(models["exported"]),
            "agreement": round(fid["agreement"], 4),
            "label_kl_mean": _num(fid["label_kl_mean"], 5), "label_kl_p95": _num(fid["label_kl_p95"], 5),
            "mcnemar_p": round(fid["mcnemar_p"], 4), "disagree": len(fid["disagreements"]),
        })
    return rows


def _fidelity_section(report: dict[str, Any]) -> list[str]:
    sets = report.get("sets") or {}
    if not sets:
        return []
    parts = ["## Fidelity of the exported model to the merged one\n\n"
             "Agreement: rows where both answer the same. Label KL: KL(merged ‖ exported) of the "
             "two distributions over the labels at the answer position (each label's tokens "
             "teacher-forced after the prompt, summed log-probabilities, normalized over the "
             "labels). McNemar p: exact test on the rows only one of them gets right (p ≥ 0.05: "
             "the accuracy difference is within noise).\n\n" + _md_table(fidelity_table(sets))]
    trained = trained_fidelity_table(sets)
    if trained:
        parts.append("## Fidelity to the trained model (QLoRA)\n\nThe trained model is the "
                     "4-bit base with the adapter, as the fine-tune computed it; label KL is "
                     "KL(trained ‖ model).\n\n" + _md_table(trained))
    for name, summary in sets.items():
        if name != "eval" and summary["models"]:
            parts.append(f"### Models on {name}\n\n" + _md_table(model_table(summary["models"])))
        wrong = (summary["fidelity"].get("exported_vs_merged") or {}).get("disagreements") or []
        if wrong:
            shown = [{k: d[k] for k in ("line", "gold", "reference", "model")} for d in wrong[:20]]
            parts.append(f"Rows of {name} where the exported model answers otherwise than the "
                         f"merged one ({len(wrong)}; `reference` is merged):\n\n" + _md_table(shown))
    return parts


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    """Write report.json, report.md and the pictures atomically; return report.json's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "loss_curve.svg", loss_curve_svg(report["training"]["loss_curve"]))
    exported = report["models"].get("exported")
    if exported:
        write_atomic(out_dir / "confusion_exported.svg",
                     confusion_svg(exported["confusion"], "exported model: true label vs answer"))
    if report.get("export_search"):
        write_atomic(out_dir / "recipe_search.svg", search_svg(report["export_search"]))
        if report["export_search"].get("pareto_front_kl"):
            write_atomic(out_dir / "recipe_search_kl.svg",
                         search_svg(report["export_search"], "label_kl"))
    write_atomic(out_dir / "report.md", render_markdown(report))
    path = out_dir / "report.json"
    write_atomic(path, json.dumps(report, indent=2, ensure_ascii=False))
    return path
