"""A killed or interrupted `slmflow run` (through Prefect, the default) leaves no process behind.

Each test runs the tiny Phi-3 with its own PREFECT_HOME (so its temporary Prefect API is its
own) and watches the run's process tree; the kill comes when the process to catch is up: the
two-process fine-tune's ranks, the export's model builder. Afterwards no process of the run may
live: none of its descendants seen while it ran, none naming its PREFECT_HOME or output folder.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slmflow.prefect_api import APP

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/tiny-phi3_lora_cpu.yaml"
pytestmark = pytest.mark.slow
TWO_RANKS = ["finetune.distributed.processes_per_node=2", "finetune.batch_size=8",
             "finetune.max_steps=24", "finetune.checkpoint_every=4"]
GONE_WITHIN = 15.0  # seconds: generous on a busy 2-core machine; measured figures are printed


class Run:
    """`slmflow run` through Prefect, in its own session (a terminal's foreground job)."""

    def __init__(self, tmp: Path, tiny_model: Path, *overrides: str, name: str = "run") -> None:
        self.out, self.home, self.log = tmp / "out", tmp / "prefect-home", tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "slmflow.cli", "run", "--config", CONFIG,
               "--set", f"output_dir={self.out}", "--set", f"model.name_or_path={tiny_model}"]
        for o in overrides:
            cmd += ["--set", o]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
               "PREFECT_HOME": str(self.home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.seen: set[tuple[int, str]] = set()

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, proctable, *markers: str, timeout: float = 600,
                 until=lambda: True) -> None:
        """Until descendants whose command lines hold each of `markers` run (and `until()`); the
        watchers (slmflow.lifeline), whose command lines hold their command's, do not count."""
        deadline = time.monotonic() + timeout
        while True:
            self.seen |= proctable.descendants(self.proc.pid)
            lines = [line for pid, _ in proctable.alive(self.seen)
                     if "slmflow.lifeline" not in (line := proctable.cmdline(pid))]
            if all(any(m in line for line in lines) for m in markers) and until():
                return
            assert self.proc.poll() is None, f"run ended (exit {self.proc.returncode}): {self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {markers} in {timeout} s: {self.text()[-3000:]}"
            time.sleep(0.1)

    def left(self, proctable, within: float = GONE_WITHIN) -> tuple[dict, float]:
        """What of the run still lives `within` seconds from now at most; the seconds it took."""
        left, seconds = proctable.wait_gone(self.seen, within=within, text=str(self.home))
        more, _ = proctable.wait_gone(set(), within=max(0.0, within - seconds), text=str(self.out))
        return {**left, **more}, seconds

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def runs(proctable):
    started: list[Run] = []
    yield started
    for run in started:  # whatever a failing test left: the run, then anything it started
        run.stop()
        for pid, _ in proctable.alive(run.seen):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _ranks(run: Run, proctable) -> int:
    """How many of the run's fine-tune ranks are up (not torchrun, not its watcher)."""
    lines = [proctable.cmdline(p) for p, _ in proctable.alive(run.seen)]
    return sum("slmflow.stages.finetune_rank" in line and "torch.distributed.run" not in line
               for line in lines)


def test_sigkill_during_a_two_process_finetune_leaves_no_process(tiny_model, tmp_path, proctable, runs):
    run = Run(tmp_path, tiny_model, *TWO_RANKS)
    runs.append(run)
    run.wait_for(proctable, APP, "torch.distributed.run", until=lambda: _ranks(run, proctable) == 2)
    run.proc.send_signal(signal.SIGKILL)  # the run's own process only, as the OOM killer does
    run.proc.wait()
    left, seconds = run.left(proctable)
    print(f"SIGKILL during the 2-process fine-tune: {len(run.seen)} processes of the run gone "
          f"{seconds:.2f} s after it" + (f"; the last: {proctable.last}" if proctable.last else ""))
    assert left == {}, left


def test_sigkill_during_the_builder_leaves_no_process_and_the_next_run_completes(
        tiny_model, tmp_path, proctable, runs):
    steps = ["finetune.max_steps=4", "finetune.batch_size=8"]
    run = Run(tmp_path, tiny_model, *steps)
    runs.append(run)
    run.wait_for(proctable, APP, "slmflow.stages.builder_main")
    run.proc.send_signal(signal.SIGKILL)
    run.proc.wait()
    left, seconds = run.left(proctable)
    print(f"SIGKILL during the builder: {len(run.seen)} processes of the run gone {seconds:.2f} s "
          "after it" + (f"; the last: {proctable.last}" if proctable.last else ""))
    assert left == {}, left

    # The next run in the same PREFECT_HOME and output folder: a new API, the export redone.
    again = Run(tmp_path, tiny_model, *steps, name="again")
    runs.append(again)
    assert again.proc.wait(timeout=600) == 0, again.text()[-3000:]
    assert again.text().strip().splitlines()[-1] == f"report: {again.out / 'report.json'}"
    assert "stopped a temporary Prefect API" not in again.text()  # the killed run left none
    assert re.search(r"- export: loads and generates", again.text()), again.text()[-3000:]


def _checkpoints(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (out / "cache" / "adapter").glob(
        ".work-*/checkpoints/checkpoint-*/trainer_state.json"))


def test_ctrl_c_during_finetune_exits_130_stops_every_child_and_the_rerun_resumes(
        tiny_model, tmp_path, proctable, runs):
    run = Run(tmp_path, tiny_model, *TWO_RANKS)
    runs.append(run)
    run.wait_for(proctable, APP, until=lambda: _ranks(run, proctable) == 2
                 and any(4 <= s < 24 for s in _checkpoints(run.out)))
    os.killpg(run.proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground group
    started = time.monotonic()
    code = run.proc.wait(timeout=120)
    exit_seconds = time.monotonic() - started
    log = run.text()
    assert code == 130, log[-3000:]
    assert log.strip().splitlines()[-1].startswith("interrupted (SIGINT): "), log[-3000:]
    left, seconds = run.left(proctable, within=5)
    print(f"Ctrl-C during the 2-process fine-tune: exit 130 after {exit_seconds:.2f} s; "
          f"{len(run.seen)} processes of the run gone {seconds:.2f} s after it")
    assert left == {}, left
    done = _checkpoints(run.out)
    assert done and done[-1] < 24, done
    assert not (run.out / "report.json").exists()

    again = Run(tmp_path, tiny_model, *TWO_RANKS, name="again")
    runs.append(again)
    assert again.proc.wait(timeout=900) == 0, again.text()[-3000:]
    assert f"resuming from checkpoint-{done[-1]} (step {done[-1]})" in again.text(), again.text()[-3000:]
    assert (again.out / "report.json").is_file()


def test_sigterm_during_the_builder_exits_143_stops_it_and_keeps_no_half_export(
        tiny_model, tmp_path, proctable, runs):
    run = Run(tmp_path, tiny_model, "finetune.max_steps=4", "finetune.batch_size=8")
    runs.append(run)
    run.wait_for(proctable, APP, "slmflow.stages.builder_main")
    run.proc.send_signal(signal.SIGTERM)  # a job scheduler's stop, to the run's process only
    code = run.proc.wait(timeout=120)
    log = run.text()
    assert code == 143, log[-3000:]
    assert log.strip().splitlines()[-1].startswith("interrupted (SIGTERM): "), log[-3000:]
    left, seconds = run.left(proctable, within=5)
    print(f"SIGTERM during the builder: exit 143; {len(run.seen)} processes of the run gone "
          f"{seconds:.2f} s after it")
    assert left == {}, left
    onnx = run.out / "cache" / "onnx_model"  # only the stage's lock and work folders, no output
    assert [p.name for p in onnx.iterdir() if not p.name.startswith(".") and not p.name.endswith(".lock")] == []
    assert (run.out / "cache" / "merged_model").is_dir() and not (run.out / "model").exists()
