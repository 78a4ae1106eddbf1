"""Data-parallel fine-tuning: who takes part (the world), and starting the ranks.

The fine-tune stage stays in the flow's process (the flow is never re-executed per rank). With
more than one process it starts them as its own children:

- on one machine, `torchrun --standalone --nproc-per-node N -m slmflow.stages.finetune_rank
  TICKET` (torch.distributed.run): N processes with a local rendezvous;
- inside an AzureML distributed job (instance_count or processes_per_instance of the azureml pool
  above 1), the job's other processes already run `python -m slmflow.stages.finetune_rank`
  (started by `slmflow.azureml.launch`) and wait at the job's rendezvous (MASTER_ADDR,
  MASTER_PORT); the stage starts rank 0 there, and rank 0 hands every rank the fine-tune (config
  and inputs, the ticket) over torch.distributed.

Every rank trains on its share of each global batch; rank 0 alone writes checkpoints, the adapter,
the loss history and the result. A rank that fails writes its error to the work folder; the stage
fails with it. The launcher (azureml) keeps the job's rendezvous variables as SLMFLOW_DIST_* so
that nothing else in the flow sees them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from slmflow import lifeline
from slmflow.config import DistributedConfig
from slmflow.errors import ConfigError, SlmflowError

JOB_PREFIX = "SLMFLOW_DIST_"  # a distributed job's rendezvous variables, as the launcher keeps them
JOB_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
            "MASTER_ADDR", "MASTER_PORT")
PROGRESS = "SLMFLOW_PROGRESS "  # rank 0's progress lines on stdout: PROGRESS + JSON
# A rank's failure the stage may retry: the network or a peer, not the code, data or memory.
TRANSIENT = {"ConnectionError", "ConnectionResetError", "TimeoutError", "DistNetworkError",
             "DistStoreError", "DistBackendError", "BrokenPipeError"}


class RankFailed(SlmflowError):
    """A rank of a distributed fine-tune failed; the message is that rank's error."""

    exit_code = 1


@dataclass(frozen=True)
class World:
    """The processes of one fine-tune."""

    nodes: int
    per_node: int
    backend: str  # nccl or gloo
    timeout: int  # seconds: rendezvous and collectives
    job: Mapping[str, str] | None = None  # the AzureML job's rendezvous, when inside one

    @property
    def size(self) -> int:
        return self.nodes * self.per_node


def job_rendezvous(environ: Mapping[str, str] = os.environ) -> dict[str, str] | None:
    """The distributed job this process runs in (SLMFLOW_DIST_*), or None."""
    if int(environ.get(JOB_PREFIX + "WORLD_SIZE", "1") or 1) <= 1:
        return None
    found = {var: environ[JOB_PREFIX + var] for var in (*JOB_VARS, "NODES", "PROCS_PER_NODE")
             if JOB_PREFIX + var in environ}
    if "MASTER_ADDR" not in found or "MASTER_PORT" not in found:
        raise ConfigError(f"{JOB_PREFIX}WORLD_SIZE is set but not {JOB_PREFIX}MASTER_ADDR and "
                          f"{JOB_PREFIX}MASTER_PORT: start the job through slmflow.azureml.launch")
    return found


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_world(cfg: DistributedConfig, device: str, environ: Mapping[str, str] = os.environ,
                  gpus: Callable[[], int] = visible_gpus) -> World:
    """The world `cfg` asks for on this machine (or in this job), checked; refusals name the fix."""
    job = job_rendezvous(environ)
    on_cuda = device == "cuda"
    if job is not None:
        job_nodes = int(job.get("NODES", "1"))
        job_per_node = int(job.get("PROCS_PER_NODE", int(job["WORLD_SIZE"]) // job_nodes))
        nodes = job_nodes if cfg.nodes == "auto" else cfg.nodes
        per_node = job_per_node if cfg.processes_per_node == "auto" else cfg.processes_per_node
        if (nodes, per_node) != (job_nodes, job_per_node):
            raise ConfigError(
                f"finetune.distributed: {nodes} node(s) × {per_node} process(es) asked, but this "
                f"job has {job_nodes} × {job_per_node} (the azureml pool's instance_count × "
                "processes_per_instance); set both to auto or to the job's shape")
    else:
        nodes = 1 if cfg.nodes == "auto" else cfg.nodes
        if nodes > 1:
            raise ConfigError(
                f"finetune.distributed.nodes={nodes}: more than one node needs a distributed job "
                "(the azureml work pool with instance_count > 1); on one machine use nodes: 1")
        visible = gpus() if on_cuda else 0
        per_node = (max(visible, 1) if on_cuda else 1) if cfg.processes_per_node == "auto" \
            else cfg.processes_per_node
        if on_cuda and per_node > visible:
            raise ConfigError(
                f"finetune.distributed.processes_per_node={per_node}, but {visible} GPU(s) are "
                f"visible; use at most {visible} (or auto: one per GPU)")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if on_cuda else "gloo")
    if job is not None and (cfg.backend != "auto" or on_cuda != (gpus() > 0)):
        raise ConfigError("finetune.distributed.backend and finetune.device: inside a distributed "
                          "job the waiting ranks use the GPU when there is one (nccl, else gloo "
                          "on the CPU); leave both auto")
    if backend == "nccl" and not on_cuda:
        raise ConfigError("finetune.distributed.backend=nccl needs CUDA, and this fine-tune runs on "
                          "the CPU; use backend gloo (or auto)")
    return World(nodes, per_node, backend, cfg.timeout_seconds, job)


def rank_command(world: World, ticket: Path) -> tuple[list[str], dict[str, str]]:
    """The command (and environment) that starts this machine's ranks of `world`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(JOB_PREFIX)}
    env["PYTHONUNBUFFERED"] = "1"
    entry = ["-m", "slmflow.stages.finetune_rank", str(ticket)]
    if world.job is None:  # one machine: torchrun's local rendezvous
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world.per_node)))
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={world.per_node}", "--max-restarts=0", *entry], env
    # Inside the job: this process is the job's rank 0; the others wait at the job's rendezvous.
    env.update({var: world.job[var] for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")})
    env.update(RANK="0", LOCAL_RANK="0", NODE_RANK="0", LOCAL_WORLD_SIZE=str(world.per_node))
    return [sys.executable, *entry], env


def run_ranks(world: World, ticket: Path, work: Path, log: Callable[[str], None],
              progress: Callable[[int, int, dict[str, float]], None] | None) -> dict:
    """Start the ranks, pass their logs and progress on, and return rank 0's result."""
    for old in work.glob("rank-*.error"):
        old.unlink()
    (work / "result.json").unlink(missing_ok=True)
    cmd, env = rank_command(world, ticket)
    log(f"finetune: {world.size} processes ({world.nodes} node(s) × {world.per_node}, "
        f"{world.backend}): {' '.join(cmd[1:])}")
    tail: list[str] = []
    # Its own process group, stopped as one; and stopped by its watcher if this process is killed.
    proc = lifeline.spawn(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            _relay(line.rstrip("\n"), log, progress, tail)
        code = proc.wait()
    finally:
        lifeline.stop(proc)
    failures = rank_errors(work)
    if failures:
        rank, kind, message = failures[0]
        err = RankFailed(f"finetune: rank {rank} failed: {kind}: {message}")
        err.retryable = kind in TRANSIENT
        raise err
    if code != 0 or not (work / "result.json").is_file():
        raise RankFailed(f"finetune: the ranks ended with exit {code} and no result: "
                         + " | ".join(tail[-5:]))
    return json.loads((work / "result.json").read_text())


def _relay(line: str, log: Callable[[str], None], progress, tail: list[str]) -> None:
    if line.startswith(PROGRESS):
        if progress:
            event = json.loads(line[len(PROGRESS):])
            progress(event["step"], event["total"], event["last"])
        return
    tail[:] = [*tail[-19:], line]
    if line.startswith("[rank "):
        log(line)


def rank_errors(work: Path) -> list[tuple[int, str, str]]:
    """(rank, error type, message) of every failed rank, the first to fail first."""
    found = []
    for file in sorted(work.glob("rank-*.error"), key=lambda p: p.stat().st_mtime):
        info = json.loads(file.read_text())
        found.append((info["rank"], info["type"], info["message"]))
    return found
