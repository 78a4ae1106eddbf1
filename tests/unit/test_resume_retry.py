"""Fast checks of the crash, retry and clean-up rules (the slow ones are in e2e/test_robustness)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmflow.artifacts import read_verified
from slmflow.errors import ConfigError, DataError, StageCheckError
from slmflow.store import Store
from slmflow.trainer import last_checkpoint


def _checkpoint(folder: Path, step: int, state: str | None) -> None:
    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"x")
    if state is not None:
        (ckpt / "trainer_state.json").write_text(state)


def test_last_checkpoint_skips_one_killed_while_saving(tmp_path):
    assert last_checkpoint(tmp_path) is None
    _checkpoint(tmp_path, 10, json.dumps({"global_step": 10}))
    _checkpoint(tmp_path, 20, json.dumps({"global_step": 20}))
    _checkpoint(tmp_path, 30, None)  # killed before trainer_state.json (written last)
    _checkpoint(tmp_path, 40, '{"global_step": 4')  # killed while writing it
    assert last_checkpoint(tmp_path).name == "checkpoint-20"


def test_run_stage_removes_temp_folders_of_killed_builds(tmp_path):
    store = tmp_path / "store"
    left = store / "kind" / ".tmp-k1-deadbeef"
    left.mkdir(parents=True)
    (left / "half.bin").write_bytes(b"half")
    other = store / "kind" / ".tmp-k2-deadbeef"  # another key's build: not ours to touch
    other.mkdir()

    def build(out: Path, work: Path) -> dict:
        (out / "a.txt").write_text("a")
        return {}

    ref = Store.at(store).build("kind", "k1", [], build, log=lambda m: None)
    assert read_verified(ref.path) is not None
    assert sorted(p.name for p in (store / "kind").iterdir()) == [".tmp-k2-deadbeef", "k1", "k1.fingerprint.json", "k1.lock"]


class _State:
    def __init__(self, exc: BaseException | None):
        self.exc = exc

    def result(self):
        if self.exc:
            raise self.exc
        return 1


@pytest.mark.parametrize(("exc", "retry"), [
    (ConnectionError("reset by peer"), True),
    (TimeoutError("read timed out"), True),
    (OSError("Stale file handle"), True),
    (RuntimeError("NCCL communicator was aborted"), True),
    (KeyError("model.layers.0"), False),
    (TypeError("forward() got an unexpected keyword argument"), False),
    (ValueError("Target modules {'x'} not found in the base model"), False),
    (ConfigError("finetune.r: must be > 0"), False),
    (DataError("tones.jsonl:7: label"), False),
    (StageCheckError("merge: logits differ"), False),
    (MemoryError(), False),
    (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), False),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"), False),
])
def test_retry_condition(exc, retry):
    from tasks import is_transient

    assert is_transient(None, None, _State(exc)) is retry


def test_retry_condition_knows_torch_oom_by_type():
    import torch

    from tasks import is_transient

    assert is_transient(None, None, _State(torch.OutOfMemoryError("HIP error"))) is False


def test_sigkill_during_a_build_leaves_nothing_taken_as_done(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    store = tmp_path / "store"
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from slmflow.store import Store\n"
        "def build(out, work):\n"
        "    (out / 'model.bin').write_bytes(b'half')\n"
        "    (work / 'started').write_text('1')\n"
        "    time.sleep(60)\n"
        f"Store.at({str(store)!r}).build('onnx_model', 'k', [], build)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while not (store / "onnx_model" / ".work-k" / "started").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    kind = store / "onnx_model"
    assert not (kind / "k").exists()  # the stage folder appears only by the final rename
    assert [p.name for p in kind.glob(".tmp-k-*")]  # the half-built output sits in a temp folder

    def build(out: Path, work: Path) -> dict:
        (out / "model.bin").write_bytes(b"whole")
        return {}

    ref = Store.at(store).build("onnx_model", "k", [], build, log=lambda m: None)
    assert not ref.cached and (ref.path / "model.bin").read_bytes() == b"whole"
    assert sorted(p.name for p in kind.iterdir()) == ["k", "k.fingerprint.json", "k.lock"]
