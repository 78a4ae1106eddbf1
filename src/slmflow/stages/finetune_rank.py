"""One process of a distributed fine-tune (see `slmflow.distributed`).

Rank 0 reads the ticket the fine-tune stage wrote (config, inputs, output and work folders) and
hands it to the other ranks over torch.distributed; every rank trains its share; rank 0 writes
the adapter, the loss history and `result.json`. A rank that fails writes `rank-R.error` (its
error type and message) in the work folder before it exits.

Run as (by the fine-tune stage, not by hand):
    torchrun --standalone --nproc-per-node N -m slmflow.stages.finetune_rank WORK/ticket.json
    python -m slmflow.stages.finetune_rank WORK/ticket.json   # rank 0 of an AzureML job
    python -m slmflow.stages.finetune_rank                    # a waiting rank of an AzureML job
    python -m slmflow.stages.finetune_rank --release          # rank 0's launcher, at the end
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

from slmflow.artifacts import ArtifactRef, read_verified
from slmflow.config import FinetuneConfig
from slmflow.distributed import PROGRESS, World
from slmflow.lifeline import die_with_parent
from slmflow.store import Store

# A waiting rank of an AzureML job waits this long for rank 0's flow to reach the fine-tune.
FOLLOWER_WAIT = int(os.environ.get("SLMFLOW_DIST_WAIT_SECONDS", str(24 * 3600)))
RELEASE_WAIT = 300  # rank 0 releasing them: they are waiting already
CLOSE_WAIT = 60  # how long a waiting rank lets the last round's rank 0 take to exit


def _line(text: str) -> None:
    """One whole line in one write: the ranks share the stage's pipe."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def say(rank: int, message: str) -> None:
    _line(f"[rank {rank}] {message}")


def report_progress(step: int, total: int, last: dict[str, float]) -> None:
    _line(PROGRESS + json.dumps({"step": step, "total": total, "last": last}))


def join(ticket_path: Path | None, timeout: float) -> dict[str, Any] | None:
    """Join the process group (env://) and get rank 0's ticket; None: nothing to do, exit."""
    import torch
    import torch.distributed as dist

    on_cuda = torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=timedelta(seconds=timeout))
    box = [json.loads(ticket_path.read_text()) if ticket_path and dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_input(ref: dict[str, Any], store: Store) -> ArtifactRef:
    """An input of the ticket, here: rank 0's folder where this node sees it (same machine or a
    shared mount), else downloaded from the shared store (`cache_remote`) and verified."""
    ref = ArtifactRef.model_validate(ref)
    found = read_verified(ref.path) if ref.path.is_dir() else None
    external = ref.meta.get("external_model_dir")
    if found is not None and (not external or Path(external).is_dir()):
        return found
    if store.remote and not external:
        here = Store.at(Path.cwd() / "slmflow-rank-store", store.remote)
        pulled = here.pull(ref.kind, ref.key)
        if pulled is not None and pulled.sha256 == ref.sha256:
            return pulled
    where = f"model folder {external}" if external else f"{ref.kind} {ref.uri}"
    raise FileNotFoundError(
        f"this node sees no {where}: give every node a shared cache_remote (and a base model the "
        "store keeps: gguf, a hub id or a registry model), or a folder every node mounts")


def train_rank(ticket: dict[str, Any]) -> None:
    """This rank's part of the fine-tune the ticket describes."""
    import torch.distributed as dist

    from slmflow.stages.finetune import Rank, train

    rank = dist.get_rank()
    world = World(**ticket["world"])
    store = Store.model_validate(ticket["store"]) if ticket.get("store") else Store.at(".")
    base, data = local_input(ticket["base"], store), local_input(ticket["data"], store)

    def agree(value: int) -> bool:
        seen: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(seen, value)
        return len(set(seen)) == 1

    me = Rank(world, rank, int(os.environ.get("LOCAL_RANK", "0")), agree)
    work = Path(ticket["work"])
    say(rank, f"training its share of each global batch (world size {world.size})")
    metrics = train(FinetuneConfig.model_validate(ticket["cfg"]), base, data, Path(ticket["out"]),
                    work / "checkpoints", lambda m: say(rank, m),
                    report_progress if rank == 0 else None, me)
    if rank == 0:
        (work / "result.json").write_text(json.dumps(metrics))
    say(rank, "done")


def record_failure(work: Path | None, rank: int, exc: BaseException) -> None:
    """Leave this rank's error where the stage reads it (same machine), and on stderr."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    say(rank, f"failed: {type(exc).__name__}: {message}")
    if work is not None and work.is_dir():
        (work / f"rank-{rank}.error").write_text(json.dumps(
            {"rank": rank, "type": type(exc).__name__, "message": message[:2000]}))
    traceback.print_exc()


def run_once(ticket_path: Path | None, timeout: float) -> bool:
    """One fine-tune as one rank; False when rank 0 said there is none (the job is over)."""
    import torch.distributed as dist

    rank, work = int(os.environ.get("RANK", "0")), None
    try:
        ticket = join(ticket_path, timeout)
        if ticket is None:
            return False
        work = Path(ticket["work"])
        train_rank(ticket)
        dist.barrier()
        return True
    except BaseException as exc:
        record_failure(work or (ticket_path.parent if ticket_path else None), rank, exc)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def wait_until_closed(host: str, port: int, limit: float = CLOSE_WAIT) -> bool:
    """Wait until nothing listens at host:port (at most `limit` s); True if it closed.

    Rank 0 of a round hosts the rendezvous (a TCPStore) at MASTER_ADDR:MASTER_PORT and exits
    after it. A waiting rank that joined the next round while that process was still exiting
    would register with the dying store and wait on it for ever; the next rank 0 (the stage's
    next fine-tune or the launcher's release) starts only after the last one has exited, so
    waiting here for the port to close first makes the order certain."""
    import socket
    import time

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                pass
        except OSError:
            return True
        time.sleep(0.2)
    return False


def follow() -> int:
    """A waiting rank of an AzureML job: take part in every fine-tune of the flow run until
    rank 0's launcher says the flow run is over."""
    from accelerate.state import AcceleratorState, PartialState

    rank = int(os.environ.get("RANK", "0"))
    while True:
        try:
            if not run_once(None, FOLLOWER_WAIT):
                return 0
        except Exception as exc:  # noqa: BLE001 - rank 0 reports the fine-tune's failure
            say(rank, f"that fine-tune failed ({type(exc).__name__}); waiting for the next")
        AcceleratorState._reset_state(True)  # a new Trainer next time, in a new process group
        PartialState._reset_state()
        if not wait_until_closed(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])):
            say(rank, f"the last round's rank 0 still listens after {CLOSE_WAIT} s; joining anyway")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        return follow()
    if argv == ["--release"]:  # rank 0's launcher: the flow run is over, the waiting ranks exit
        run_once(None, RELEASE_WAIT)
        return 0
    die_with_parent(signal.SIGTERM)  # torchrun or the stage killed: this rank stops too
    ticket = Path(argv[0])
    timeout = json.loads(ticket.read_text())["world"]["timeout"]
    try:
        run_once(ticket, timeout)
    except BaseException:  # noqa: BLE001 - recorded for the stage; the exit status says it
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
