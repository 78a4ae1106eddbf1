"""What an AzureML job of the `azureml` worker runs: secrets in, then Prefect's engine.

Run as (the worker writes this command into the job):
    python -m slmflow.azureml.launch -- prefect flow-run execute

1. Each `SLMFLOW_SECRET_<VAR>=keyvault://VAULT/NAME` is fetched from Azure Key Vault with the
   compute's managed identity and set as `<VAR>` in this process only (the job definition holds
   the reference, never the value).
2. Under a PyTorch distribution (instance_count or processes_per_instance above 1) the flow run
   executes once, on rank 0, with the distribution variables removed (slmflow's stages are
   single-process: the fine-tune's Trainer sees every GPU of the node); other ranks exit 0.
3. The command after `--` replaces this process (`prefect ...` runs as `python -m prefect ...`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, MutableMapping

from slmflow.azureml.job import SECRET_PREFIX
from slmflow.uris import KeyVaultSecret, parse_keyvault

DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
             "MASTER_ADDR", "MASTER_PORT")
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


def main(argv: list[str] | None = None, environ: MutableMapping[str, str] | None = None,
         fetch: Callable[[KeyVaultSecret], str] = keyvault_fetch,
         execvpe: Callable[..., None] = os.execvpe) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m slmflow.azureml.launch -- COMMAND...", file=sys.stderr)
        return 2
    rank = global_rank(environ)
    if rank > 0:
        print(f"slmflow launch: rank {rank}: the flow run executes on rank 0 only; exiting",
              flush=True)
        return 0
    for var in DIST_VARS:
        if var in environ:
            environ[f"SLMFLOW_DIST_{var}"] = environ.pop(var)
    names = resolve_secrets(environ, fetch)
    if names:
        print(f"slmflow launch: set {', '.join(names)} from Azure Key Vault", flush=True)
    if argv[0] == "prefect":
        argv = [sys.executable, "-m", "prefect", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    environ.setdefault("SLMFLOW_JOB_DIR", os.getcwd())
    execvpe(argv[0], argv, dict(environ))
    return 0  # not reached with the real execvpe


if __name__ == "__main__":
    sys.exit(main())
