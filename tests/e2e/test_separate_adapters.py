"""export.adapters=separate on the tiny Phi-3: two tasks on one int4 base build, a bundle that
switches between their adapter files in one loaded model, and the adapter path's logits against
the builder's baked-in LoRA build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flows.pipeline import run_pipeline, run_plain
from slmflow.configio import build_config, load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TICKETS = {"train_file": "pkg:slmflow/data/tickets_small.jsonl", "text_columns": ["ticket", "intent"],
           "text_template": "### Ticket: {ticket}\n### The intent is:\n{intent}",
           "label_column": "intent", "labels": ["Billing", "Shipping", "Login", "Bug"]}
# base + adapter file against the builder's own build with the adapter baked in: measured 3.6e-7
# (int4 base, fp32 LoRA) on the tiny model; float32 sums in another order stay far below this
LOGIT_TOLERANCE = 1e-4


def _config(tiny_model: Path, out: Path, data: dict | None = None, **export: object):
    base = load_config(REPO / "configs" / "tiny-phi3_lora_cpu.yaml", [
        f"model.name_or_path={tiny_model}", f"output_dir={out}"]).model_dump(mode="json")
    base["data"].update(data or {})
    base["finetune"]["max_steps"] = 20  # what is checked is sameness, not how well it learned
    base["export"].update({"adapters": "separate", **export})
    base["evaluate"]["compare_merged_export"] = data is None  # the tone run also exports merged
    return build_config(base, source="test")


@pytest.fixture(scope="module")
def two_tasks(tiny_model, tmp_path_factory):
    """The tone task, then the ticket task, both separate, in one cache: (tones, tickets) reports."""
    root = tmp_path_factory.mktemp("separate")
    os.environ["SLMFLOW_CACHE"] = str(root / "cache")  # one cache for both runs
    try:
        tones = run_pipeline(_config(tiny_model, root / "tones"), run_plain)
        tickets = run_pipeline(_config(tiny_model, root / "tickets", TICKETS), run_plain)
    finally:
        os.environ["SLMFLOW_CACHE"] = "{output_dir}/cache"  # tests/conftest.py's
    return json.loads(tones.read_text()), json.loads(tickets.read_text()), root


def test_the_second_task_reuses_the_base_build_and_builds_only_its_adapter(two_tasks):
    tones, tickets, _ = two_tasks
    assert tones["stages"]["export_base"]["cached"] is False
    assert tickets["stages"]["export_base"]["cached"] is True
    assert tickets["stages"]["export_base"]["key"] == tones["stages"]["export_base"]["key"]
    assert tickets["stages"]["export_adapter"]["cached"] is False
    assert tickets["stages"]["export_adapter"]["key"] != tones["stages"]["export_adapter"]["key"]
    assert "export" not in tickets["stages"]  # no merged export unless asked
    # the report shows both forms side by side when both were built
    assert tones["models"]["exported"]["model_kind"] == "onnx_base+adapter"
    assert tones["models"]["exported_merged"]["model_kind"] == "onnx_model"
    assert tones["models"]["exported"]["adapter_bytes"] > 0


def test_the_published_folder_says_which_adapter_was_trained_on_what(two_tasks):
    _, _, root = two_tasks
    card = json.loads((root / "tickets" / "model" / "slmflow_model.json").read_text())
    entry = card["adapters"]["files"]["tickets_small"]
    assert entry["trained_on"]["train_file"] == TICKETS["train_file"]
    assert entry["card"]["labels"] == TICKETS["labels"]
    assert (root / "tickets" / "model" / entry["file"]).is_file()
    assert card["labels"] == TICKETS["labels"]  # the default adapter's card at the top


def _eval_rows(report: dict) -> list[dict]:
    rows = (Path(report["stages"]["prepare_data"]["uri"]) / "eval.jsonl").read_text().splitlines()
    return [json.loads(r) for r in rows]


def _exported_predictions(report: dict) -> list[str]:
    lines = (Path(report["stages"]["evaluate_exported"]["uri"]) / "predictions.jsonl").read_text()
    return [json.loads(r)["pred"] for r in lines.splitlines()]


@pytest.fixture(scope="module")
def bundle(two_tasks, tmp_path_factory):
    _, _, root = two_tasks
    out = tmp_path_factory.mktemp("bundle")
    proc = subprocess.run([sys.executable, "-m", "slmflow.cli", "bundle", "--output", str(out),
                           str(root / "tones"), str(root / "tickets")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "model"


def test_switching_adapters_in_one_model_gives_each_task_its_own_answers(two_tasks, bundle):
    from slmflow import Classifier

    tones, tickets, _ = two_tasks
    clf = Classifier(bundle, constrained=False)
    assert sorted(clf.adapters) == ["tickets_small", "tones_small"]
    for name, report, columns in (("tones_small", tones, ["phrase"]),
                                  ("tickets_small", tickets, ["ticket"]),
                                  ("tones_small", tones, ["phrase"])):  # and back
        clf.use(name)
        rows = _eval_rows(report)
        preds = [p.label for p in clf.predict([{c: r[c] for c in columns} for r in rows])]
        assert preds == _exported_predictions(report)  # the run's own evaluation, row for row
        accuracy = sum(p == r["label"] for p, r in zip(preds, rows)) / len(rows)
        assert accuracy == report["models"]["exported"]["accuracy"]
        gate = report["quality_gate"]
        assert report["models"]["merged"]["accuracy"] - accuracy <= gate["max_accuracy_drop"]


def test_base_plus_adapter_logits_match_the_builders_baked_in_build(two_tasks, bundle, tmp_path):
    import onnxruntime_genai as og

    from slmflow import onnx_adapters as oa

    tones, _, _ = two_tasks
    config = json.loads(Path(tones["stages"]["finetune"]["uri"], "adapter_config.json").read_text())
    model_dir = Path(tones["config"]["model"]["name_or_path"])
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    nodes = oa.lora_node_names(layers, config["target_modules"])
    baked = tmp_path / "baked"
    subprocess.run([sys.executable, "-m", "slmflow.stages.builder_main", "-i", str(model_dir),
                    "-o", str(baked), "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "c"),
                    "--extra_options", "hf_token=false", "algo_config=k_quant_mixed",
                    f"adapter_path={tones['stages']['finetune']['uri']}",
                    "nodes_to_exclude=" + ",".join(nodes)],
                   cwd=tmp_path, env={**os.environ, "GIT_DIR": os.devnull}, check=True,
                   capture_output=True, timeout=600)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundle)
    prompt = np.asarray([tokenizer(_eval_rows(tones)[0]["prompt"])["input_ids"]], dtype=np.int32)

    def logits(folder: Path, adapters=None, name=None) -> np.ndarray:
        model = og.Model(str(folder)) if adapters is None else adapters[0]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt.shape[1] + 4, batch_size=1)
        gen = og.Generator(model, params)
        if adapters is not None:
            gen.set_active_adapter(adapters[1], name)
        gen.append_tokens(prompt)
        out = [gen.get_output("logits")[0, -1].copy()]
        for _ in range(3):
            gen.generate_next_token()
            out.append(gen.get_output("logits")[0, -1].copy())
        return np.stack(out)

    model = og.Model(str(bundle))
    loaded = og.Adapters(model)
    for name in ("tones_small", "tickets_small"):
        loaded.load(str(bundle / f"{name}.onnx_adapter"), name)
    first = logits(bundle, (model, loaded), "tones_small")
    other = logits(bundle, (model, loaded), "tickets_small")
    again = logits(bundle, (model, loaded), "tones_small")
    expected = logits(baked)
    assert np.abs(first - expected).max() < LOGIT_TOLERANCE
    np.testing.assert_array_equal(first, again)  # switching leaves nothing behind
    assert np.abs(other - expected).max() > 100 * LOGIT_TOLERANCE  # the other adapter differs


SEARCHED = ["int4_k_quant_mixed", "int4_rtn_b32"]  # the tone run's recipe, and a smaller one


@pytest.fixture(scope="module")
def searched(two_tasks, tiny_model):
    """The tone task again with export.recipe=auto over two recipes, in the same cache: the
    fine-tune and the k_quant_mixed base build are the tone run's; the gate (1.0, the tiny
    config's) holds both, so the smaller wins whatever the random-init model answers."""
    _, _, root = two_tasks
    os.environ["SLMFLOW_CACHE"] = str(root / "cache")
    try:
        config = _config(tiny_model, root / "search", recipe="auto", search={"candidates": SEARCHED})
        path = run_pipeline(config, run_plain)
    finally:
        os.environ["SLMFLOW_CACHE"] = "{output_dir}/cache"
    return json.loads(path.read_text()), root


def test_the_recipe_search_builds_judges_and_publishes_base_plus_adapter(two_tasks, searched):
    from slmflow import onnx_adapters as oa

    tones, _, _ = two_tasks
    report, root = searched
    search, stages = report["export_search"], report["stages"]
    assert search["form"] == "separate" and search["left_out"] == {}
    records = {r["recipe"]: r for r in search["candidates"]}
    assert list(records) == SEARCHED and search["chosen"] == "int4_rtn_b32"
    for name, r in records.items():  # base build + this fine-tune's adapter file, evaluated together
        assert r["verdict"] == "passed" and r["size_bytes"] == r["base_bytes"] + r["adapter_bytes"]
        assert r["onnx_key"] == stages[f"export_base[{name}]"]["key"]
        assert r["adapter_key"] == stages[f"export_adapter[{name}]"]["key"]
        metrics = json.loads((Path(stages[f"evaluate_exported[{name}]"]["uri"]) / "metrics.json").read_text())
        assert metrics["model_kind"] == "onnx_base+adapter" and metrics["accuracy"] == r["accuracy"]
        assert f"export[{name}]" not in stages  # no merged candidate
    assert records["int4_rtn_b32"]["base_bytes"] < records["int4_k_quant_mixed"]["base_bytes"]
    # the k_quant_mixed candidate is the tone run's base build and adapter file: keyed alike
    assert stages["export_base[int4_k_quant_mixed]"]["cached"] is True
    assert stages["export_base[int4_k_quant_mixed]"]["key"] == tones["stages"]["export_base"]["key"]
    assert stages["export_adapter[int4_k_quant_mixed]"]["key"] == tones["stages"]["export_adapter"]["key"]
    assert stages["export_base[int4_rtn_b32]"]["cached"] is False
    # published: the chosen base, the adapter file made for it, judged as base + adapter
    assert report["models"]["exported"]["model_kind"] == "onnx_base+adapter"
    assert report["models"]["exported"]["accuracy"] == records["int4_rtn_b32"]["accuracy"]
    folder = root / "search" / "model"
    card = json.loads((folder / "slmflow_model.json").read_text())
    assert card["adapters"]["base_version"] == oa.base_version(stages["export_base[int4_rtn_b32]"]["sha256"])
    assert (folder / card["adapters"]["files"]["tones_small"]["file"]).is_file()
    assert (folder / "model.onnx").is_file() and not (folder / "adapter.onnx_adapter").exists()
    # evaluate.compare_merged_export: the merged export of the chosen recipe beside it
    assert report["models"]["exported_merged"]["model_kind"] == "onnx_model"
    assert stages["export"]["key"] != tones["stages"]["export"]["key"]  # rtn_b32, not k_quant_mixed
    md = (root / "search" / "report.md").read_text()
    assert "Candidates in the separate form" in md and "| base_mb | adapter_mb |" in md


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def bundle_server(bundle):
    """`slmflow serve` on the two-adapter bundle, on a free 127.0.0.1 port; stopped afterwards."""
    import time

    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "slmflow.cli", "serve", "--model", str(bundle),
                             "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # a timeout, not a speed check
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_answers_each_request_with_its_adapter_while_requests_interleave(two_tasks, bundle_server):
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    tones, tickets, _ = two_tasks
    tasks = {"tones_small": (tones, "phrase"), "tickets_small": (tickets, "ticket")}
    labels = {name: report["config"]["data"]["labels"] for name, (report, _) in tasks.items()}
    rows = {name: _eval_rows(report) for name, (report, _) in tasks.items()}
    expected = {name: _exported_predictions(report) for name, (report, _) in tasks.items()}
    with httpx.Client(base_url=bundle_server, timeout=120) as client:
        health = client.get("/health").json()
        assert health["adapters"] == labels and health["default_adapter"] == "tones_small"
        assert health["labels"] == labels["tones_small"]
        bad = client.post("/classify", json={"text": "x", "adapter": "tones"})
        assert bad.status_code == 422
        assert "has no adapter 'tones'; it has tones_small, tickets_small" in bad.json()["detail"]
        default = client.post("/classify", json={"texts": [r["phrase"] for r in rows["tones_small"]],
                                                 "constrained": False}).json()
        assert default["adapter"] == "tones_small"
        assert [p["label"] for p in default["predictions"]] == expected["tones_small"]

    def ask(i: int) -> tuple[str, int, dict]:  # alternate adapters, one row each, 8 clients at once
        name = ("tones_small", "tickets_small")[i % 2]
        row = rows[name][i // 2 % len(rows[name])]
        body = {"text": {tasks[name][1]: row[tasks[name][1]]}, "constrained": False}
        if i % 4 != 0:  # every fourth tones request names no adapter: the default answers
            body["adapter"] = name
        with httpx.Client(base_url=bundle_server, timeout=300) as c:
            return name, i // 2 % len(rows[name]), c.post("/classify", json=body).json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(16)))
    for name, n, body in answers:  # each the run's own evaluation of that task's row
        assert body["adapter"] == name and list(body["probabilities"]) == labels[name]
        assert body["label"] == expected[name][n], (name, n, body)


def test_an_adapter_file_of_another_base_build_is_one_line(bundle, tmp_path):
    import onnxruntime as ort

    from slmflow import Classifier
    from slmflow import onnx_adapters as oa
    from slmflow.modelcard import ModelFolderError

    copy = tmp_path / "model"
    shutil.copytree(bundle, copy)
    params = ort.AdapterFormat.read_adapter(str(copy / "tickets_small.onnx_adapter")).get_parameters()
    (copy / "tickets_small.onnx_adapter").unlink()
    oa.export_adapter({k: v.numpy() for k, v in params.items()}, copy / "tickets_small.onnx_adapter", 7)
    with pytest.raises(ModelFolderError, match=r"^adapter tickets_small.onnx_adapter was exported "
                       r"for base version 7, the base in .* is version \d+; export the adapter "
                       r"again") as info:
        Classifier(copy)
    assert "\n" not in str(info.value)


def _build(model: Path, out: Path, adapter: Path, nodes: list[str], cache: Path) -> None:
    subprocess.run([sys.executable, "-m", "slmflow.stages.builder_main", "-i", str(model), "-o",
                    str(out), "-p", "int4", "-e", "cpu", "-c", str(cache), "--extra_options",
                    "hf_token=false", "algo_config=k_quant", f"adapter_path={adapter}",
                    "nodes_to_exclude=" + ",".join(nodes)],
                   env={**os.environ, "GIT_DIR": os.devnull}, check=True, capture_output=True,
                   timeout=600)


def test_a_llama_adapter_on_every_projection_matches_the_baked_in_build(tiny_model, tmp_path):
    """SmolLM2's layout (Llama: q, k, v apart, grouped-query k/v, the MLP's gate/up/down) on a
    random two-layer model: every LoRA input mapped, logits as the builder's own LoRA build."""
    import onnxruntime_genai as og
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slmflow import onnx_adapters as oa

    torch.manual_seed(0)
    model_dir, adapter = tmp_path / "llama", tmp_path / "adapter"
    LlamaForCausalLM(LlamaConfig(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True)).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(model_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir),
                          LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():  # a trained adapter's B is not zero
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft.save_pretrained(adapter)

    nodes = oa.lora_node_names(2, targets)
    oa.write_shape_adapter(model_dir, targets, 8, tmp_path / "shape")
    _build(model_dir, tmp_path / "base", tmp_path / "shape", nodes, tmp_path / "c")
    _build(model_dir, tmp_path / "baked", adapter, nodes, tmp_path / "c")
    params = oa.expose_lora_inputs(tmp_path / "base", nodes)
    assert len(params) == 2 * 7 * 2
    config, weights = oa.read_peft(adapter)
    oa.export_adapter(oa.adapter_tensors(config, weights, params), tmp_path / "a.onnx_adapter", 1)

    def logits(folder: Path, adapter_file: Path | None = None) -> np.ndarray:
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=12, batch_size=1)
        gen = og.Generator(model, params)
        if adapter_file is not None:
            loaded = og.Adapters(model)
            loaded.load(str(adapter_file), "a")
            gen.set_active_adapter(loaded, "a")
        gen.append_tokens(np.asarray([[1, 5, 9, 33, 70, 100, 7]], dtype=np.int32))
        out = [gen.get_output("logits")[0, -1].copy()]
        for _ in range(3):
            gen.generate_next_token()
            out.append(gen.get_output("logits")[0, -1].copy())
        return np.stack(out)

    baked = logits(tmp_path / "baked")
    assert np.abs(logits(tmp_path / "base", tmp_path / "a.onnx_adapter") - baked).max() < LOGIT_TOLERANCE
    assert np.abs(logits(tmp_path / "base") - baked).max() > 100 * LOGIT_TOLERANCE  # the adapter matters
