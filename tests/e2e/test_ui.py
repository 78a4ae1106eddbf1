"""The Prefect UI in a real browser: run a deployment from its form, watch it complete, read the report.

Headless Debian chromium driven by Playwright, against the server of `infra/local/up`
(fixture `local_stack`). Screenshots go to test-output/ui/ (or $SLMFLOW_TEST_OUTPUT/ui).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("SLMFLOW_CHROMIUM", "/usr/bin/chromium")
OUT = Path(os.environ.get("SLMFLOW_TEST_OUTPUT", Path(__file__).resolve().parents[2] / "test-output")) / "ui"


def _browser_or_skip():
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e .[dev])")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        missing.append(f"chromium at {CHROMIUM} (apt-get install -y chromium)")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs both: a missing one is a broken CI, not a skip
        pytest.skip(reason)


@pytest.fixture
def page():
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def field_input(page, label: str):
    """The input of the innermost form property titled `label`."""
    title = page.locator(".schema-form-property__label", has_text=re.compile(rf"^{re.escape(label)}"))
    return page.locator(".schema-form-property", has=title).last.locator("input")


def open_run_form(page, stack, deployment_id: str) -> None:
    page.goto(f"{stack.url}/deployments/deployment/{deployment_id}")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    page.wait_for_url(re.compile(r"/run\?"))


def test_run_from_the_ui_form(local_stack, page):
    from playwright.sync_api import expect

    stack = local_stack
    deployment = stack.deployment("local-cpu")
    page.goto(f"{stack.url}/deployments/deployment/{deployment['id']}")
    expect(page.get_by_text("flows.pipeline.slmflow_pipeline")).to_be_visible()
    page.screenshot(path=OUT / "01-deployment.png")

    # a bad value is refused: the server names the field, no run is created
    open_run_form(page, stack, deployment["id"])
    tokens = field_input(page, "Max new tokens")
    expect(tokens).to_have_value("4")  # configs/tiny-phi3_lora_cpu.yaml
    before = len(stack.flow_runs(deployment["id"]))
    tokens.fill("0")
    page.get_by_role("button", name="Submit").click()
    expect(page.get_by_text(re.compile(
        r"Validation failed for field 'config\.evaluate\.max_new_tokens'")).first).to_be_visible()
    page.screenshot(path=OUT / "02-bad-value-refused.png")
    assert len(stack.flow_runs(deployment["id"])) == before
    assert "/run?" in page.url  # still on the form

    # a good value: submitted, picked up by a worker, Completed, report artifact shown
    known = {r["id"] for r in stack.flow_runs(deployment["id"])}
    tokens.fill("3")
    field_input(page, "Max steps").fill("20")  # as the CLI test: its fine-tune is reused
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url(re.compile(rf"/deployments/deployment/{deployment['id']}(\?|$)"))
    run = stack.wait_for_new_run(deployment["id"], known)
    flow_run_id = run["id"]
    assert run["parameters"]["config"]["evaluate"]["max_new_tokens"] == 3
    assert run["parameters"]["config"]["finetune"]["max_steps"] == 20
    worker = subprocess.Popen(
        [str(stack.bin / "prefect"), "worker", "start", "--pool", "local-cpu", "--run-once"],
        cwd=stack.workdir, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        page.screenshot(path=OUT / "03-run-submitted.png")
        page.goto(f"{stack.url}/runs/flow-run/{flow_run_id}")
        expect(page.locator(".state-badge", has_text="Completed").first).to_be_visible(timeout=600_000)
        page.screenshot(path=OUT / "04-run-completed.png")
        page.get_by_text("Artifacts", exact=True).first.click()
        expect(page.get_by_text("slmflow-report").first).to_be_visible()
        page.screenshot(path=OUT / "05-artifacts.png")
        page.get_by_text("slmflow-report").first.click()
        expect(page.get_by_text("Quality gate").first).to_be_visible()
        for alt in ("confusion", "loss curve"):  # the pictures travel inside the artifact
            image = page.locator(f"img[alt='{alt}']").first
            expect(image).to_be_visible()
            assert image.evaluate("i => i.complete && i.naturalWidth > 0"), alt
        page.screenshot(path=OUT / "06-report-artifact.png", full_page=True)
    finally:
        out, _ = worker.communicate(timeout=600)
    assert worker.returncode == 0, out[-3000:]
    assert stack.api(f"/flow_runs/{flow_run_id}")["state"]["type"] == "COMPLETED"
