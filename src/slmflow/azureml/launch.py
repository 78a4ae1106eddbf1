"""What an AzureML job of the `azureml` worker runs: secrets in, then Prefect's engine.

Run as (the worker writes this command into the job):
    python -m slmflow.azureml.launch -- prefect flow-run execute

1. Each `SLMFLOW_SECRET_<VAR>=keyvault://VAULT/NAME` is fetched from Azure Key Vault with the
   compute's managed identity and set as `<VAR>` in this process only (the job definition holds
   the reference, never the value).
2. Without a PyTorch distribution, the command after `--` replaces this process (`prefect ...`
   runs as `python -m prefect ...`).
3. Under a PyTorch distribution (instance_count or processes_per_instance above 1) the flow run
   executes once, on rank 0, as a child of this process, with the job's rendezvous variables
   kept as SLMFLOW_DIST_* (the fine-tune stage uses them; nothing else sees them). Every other
   rank runs `python -m slmflow.stages.finetune_rank` and waits at the job's rendezvous: it
   takes part in each distributed fine-tune of the flow run (see `slmflow.distributed`). When the
   flow run ends, rank 0 joins the rendezvous once more with nothing to do, and the waiting
   ranks exit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, MutableMapping

from slmflow.azureml.job import SECRET_PREFIX
from slmflow.distributed import JOB_PREFIX, JOB_VARS
from slmflow.uris import KeyVaultSecret, parse_keyvault

DIST_VARS = JOB_VARS  # the job's rendezvous: for the fine-tune's ranks only
RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def keyvault_fetch(ref: KeyVaultSecret) -> str:
    """The value of a Key Vault secret, read with the ambient Azure identity."""
    from azure.keyvault.secrets import SecretClient

    from slmflow.azureml.client import make_credential

    return SecretClient(ref.vault_url, make_credential()).get_secret(ref.name).value


def resolve_secrets(
    environ: MutableMapping[str, str], fetch: Callable[[KeyVaultSecret], str] = keyvault_fetch
) -> list[str]:
    """Set each `<VAR>` named by a `SLMFLOW_SECRET_<VAR>` reference; return the names set."""
    done = []
    for key in sorted(k for k in environ if k.startswith(SECRET_PREFIX)):
        name = key[len(SECRET_PREFIX):]
        if environ.get(name):
            continue  # already given (e.g. by the compute): keep it
        environ[name] = fetch(parse_keyvault(environ[key], key))
        done.append(name)
    return done


def global_rank(environ: MutableMapping[str, str]) -> int:
    for var in RANK_VARS:
        if environ.get(var, "").isdigit():
            return int(environ[var])
    return 0


def run_flow_then_release(argv: list[str], environ: MutableMapping[str, str]) -> int:
    """Rank 0 of a distributed job: the flow run as a child, then release the waiting ranks."""
    import signal
    import subprocess

    child = subprocess.Popen(argv, env=dict(environ))
    for sig in (signal.SIGTERM, signal.SIGINT):  # a cancelled job stops the flow run too
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    code = child.wait()
    release = {k: v for k, v in environ.items() if not k.startswith(JOB_PREFIX)}
    release.update({var: environ[JOB_PREFIX + var] for var in ("MASTER_ADDR", "MASTER_PORT",
                                                               "WORLD_SIZE")})
    release.update(RANK="0", LOCAL_RANK="0")
    print("slmflow launch: the flow run ended; releasing the waiting ranks", flush=True)
    subprocess.run([sys.executable, "-m", "slmflow.stages.finetune_rank", "--release"],
                   env=release, check=False, timeout=900)
    return code


def main(argv: list[str] | None = None, environ: MutableMapping[str, str] | None = None,
         fetch: Callable[[KeyVaultSecret], str] = keyvault_fetch,
         execvpe: Callable[..., None] = os.execvpe,
         run_rank0: Callable[[list[str], MutableMapping[str, str]], int] = run_flow_then_release,
         ) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m slmflow.azureml.launch -- COMMAND...", file=sys.stderr)
        return 2
    names = resolve_secrets(environ, fetch)
    if names:
        print(f"slmflow launch: set {', '.join(names)} from Azure Key Vault", flush=True)
    environ.setdefault("SLMFLOW_JOB_DIR", os.getcwd())
    rank = global_rank(environ)
    if rank > 0:
        print(f"slmflow launch: rank {rank} waits to take part in the flow run's fine-tune",
              flush=True)
        follower = [sys.executable, "-m", "slmflow.stages.finetune_rank"]
        execvpe(follower[0], follower, dict(environ))
        return 0  # not reached with the real execvpe
    distributed = int(environ.get("WORLD_SIZE", "1") or 1) > 1
    for var in DIST_VARS:
        if var in environ:
            environ[JOB_PREFIX + var] = environ.pop(var)
    if argv[0] == "prefect":
        argv = [sys.executable, "-m", "prefect", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    if distributed:
        return run_rank0(argv, environ)
    execvpe(argv[0], argv, dict(environ))
    return 0  # not reached with the real execvpe


if __name__ == "__main__":
    sys.exit(main())
