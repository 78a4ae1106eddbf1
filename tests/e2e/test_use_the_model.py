"""Using the published model on the tiny Phi-3: the model card, `Classifier` (free answers equal to
the evaluation's, constrained answers always a label), `slmflow predict` and `slmflow serve`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from slmflow.configio import load_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _config(tiny_model: Path, out: Path):
    # 2 LoRA steps: a model that has learned nothing (its free answers are noise)
    return load_config(REPO / "configs" / "tiny-phi3_lora_cpu.yaml", [
        f"model.name_or_path={tiny_model}", f"output_dir={out}", "finetune.max_steps=2",
        "finetune.checkpoint_every=2"])


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory):
    """The pipeline without Prefect (about 30 s); (config, report)."""
    from flows.pipeline import run_pipeline, run_plain

    config = _config(tiny_model, tmp_path_factory.mktemp("use") / "run")
    path = run_pipeline(config, run_plain)
    return config, json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def noise_model(tiny_run, tmp_path_factory):
    """The random-init base exported to int4, evaluated, and published with its card: free answers
    that are mostly not labels; (published folder, the evaluation's rows, the eval split)."""
    from slmflow.artifacts import read_verified
    from slmflow.folders import read_split
    from slmflow.manifest import publish_model
    from slmflow.preflight import store_for
    from slmflow.stage import run_stage
    from slmflow.stages import STAGES

    config, report = tiny_run
    store = store_for(config)
    base = read_verified(Path(report["stages"]["base_model"]["uri"]))
    data = read_verified(Path(report["stages"]["prepare_data"]["uri"]))
    quiet = {"log": lambda m: None}
    onnx = run_stage(STAGES["export"], config.export, store, merged=base, data=data, **quiet)
    evaluation = run_stage(STAGES["evaluate"], config.evaluate, store, model=onnx, data=data,
                           labels=config.data.labels, **quiet)
    folder = publish_model(onnx, tmp_path_factory.mktemp("noise"),
                           {"config": config.model_dump(mode="json")})
    rows = [json.loads(line) for line in (evaluation.path / "predictions.jsonl").open()]
    return folder, rows, read_split(data, "eval")


def test_run_reports_free_and_constrained_accuracy_and_publishes_the_card(tiny_run):
    config, report = tiny_run
    for who in ("base", "merged", "exported"):
        m = report["models"][who]
        assert 0.0 <= m["accuracy_constrained"] <= 1.0
        assert m["constrained_by"] == ("guidance" if who == "exported" else "label_scores")
    assert report["quality_gate"]["answers"] == "free"
    md = (Path(config.output_dir) / "report.md").read_text()
    assert "accuracy_constrained" in md and "(free answers)" in md
    card = json.loads((Path(report["exported_model_dir"]) / "slmflow_model.json").read_text())
    assert card["labels"] == config.data.labels and card["format_version"] == 1


def test_free_answers_equal_the_evaluation_row_for_row(noise_model):
    from slmflow import Classifier

    folder, evaluated, split = noise_model
    clf = Classifier(folder)
    free = clf.predict(split, constrained=False)
    assert [(p.label, p.answer) for p in free] == [(r["pred"], r["answer"]) for r in evaluated]
    assert sum(r["pred"] == "(other)" for r in evaluated) >= len(evaluated) // 2  # noise indeed
    for p, r in zip(free, evaluated):
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
        assert p.probabilities == pytest.approx(r["label_probs"], abs=1e-5)


def test_constrained_answers_are_always_a_label(noise_model):
    from slmflow import Classifier

    folder, evaluated, split = noise_model
    clf = Classifier(folder)
    texts = [r["phrase"] for r in split] + ["", "zzz qqq", "Tell me a long story about ships."]
    preds = clf.predict(texts)
    assert all(p.label in clf.labels and p.answer == p.label for p in preds), preds
    assert all(p.confidence == p.probabilities[p.label] for p in preds)
    assert [p.label for p in preds[:len(split)]] == [r["pred_constrained"] for r in evaluated]
    one = clf(texts[0])
    assert one == preds[0] and sum(one.probabilities.values()) == pytest.approx(1.0)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmflow.cli", *args], capture_output=True,
                          text=True, timeout=600, check=False, cwd=REPO)


def test_predict_cli_labels_a_file_and_refuses_bad_columns(noise_model, tmp_path):
    folder, _, split = noise_model
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"phrase": r["phrase"], "id": i}) + "\n"
                            for i, r in enumerate(split)))
    out = tmp_path / "answers.jsonl"
    proc = _cli("predict", "--model", str(folder), "--input", str(rows), "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = [json.loads(line) for line in out.open()]
    assert [a["id"] for a in answers] == list(range(len(split)))
    assert all(a["label"] in ("Sad", "Joy", "Fear", "Surprise") for a in answers)  # constrained
    assert "examples/s" in proc.stderr.strip().splitlines()[-1]
    texts = _cli("predict", "--model", str(folder), "--free", "one text", "another")
    assert texts.returncode == 0 and len(texts.stdout.splitlines()) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("text\nhello\n")
    proc = _cli("predict", "--model", str(folder), "--input", str(bad))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "lacks column(s) ['phrase']" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(noise_model):
    """`slmflow serve` on a free 127.0.0.1 port; its base URL; stopped afterwards."""
    import httpx

    folder = noise_model[0]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "slmflow.cli", "serve", "--model", str(folder),
                             "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
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


def test_serve_answers_single_batch_concurrent_and_bad_requests(server, noise_model):
    import httpx

    _, evaluated, split = noise_model
    labels = ["Sad", "Joy", "Fear", "Surprise"]
    with httpx.Client(base_url=server, timeout=120) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["labels"] == labels
        one = client.post("/classify", json={"text": split[0]["phrase"]})
        assert one.status_code == 200 and one.json()["label"] == evaluated[0]["pred_constrained"]
        batch = client.post("/classify", json={"texts": [r["phrase"] for r in split],
                                               "constrained": False})
        assert batch.status_code == 200
        assert [p["label"] for p in batch.json()["predictions"]] == [r["pred"] for r in evaluated]
        bad = client.post("/classify", content=b"{oops", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["detail"]
        assert client.post("/classify", json={"texts": 5}).status_code == 422
        assert client.post("/classify", json={}).status_code == 422
        assert client.get("/classify").status_code == 405

    def ask(i: int) -> tuple[int, int, dict]:
        with httpx.Client(base_url=server, timeout=120) as c:
            r = c.post("/classify", json={"text": split[i % len(split)]["phrase"]})
            return i, r.status_code, r.json()

    with ThreadPoolExecutor(8) as pool:  # 8 clients at once: each gets its own row's answer
        results = list(pool.map(ask, range(8)))
    for i, code, body in results:
        assert code == 200 and body["label"] == evaluated[i % len(split)]["pred_constrained"]
