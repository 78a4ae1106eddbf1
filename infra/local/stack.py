"""A local Prefect stack for slmflow: server on 127.0.0.1, work pools, deployments, a worker.

`up` starts a Prefect server (SQLite under the state folder, or PostgreSQL with `--postgres`),
creates the work pools `local-cpu` and `local-gpu` (process) and `azureml` (when that worker type
is installed), deploys the pipeline (deployments/deploy.py) and starts a worker on `local-cpu`.
`down` stops everything `up` started (process groups recorded in the state folder).

Run as:
    infra/local/up [--port 4200] [--postgres] [--no-worker] [--worker-pool local-cpu ...]
    infra/local/up --host 0.0.0.0 --auth-file ~/.config/slmflow/prefect-auth   # reachable by others
    infra/local/down

The server listens on 127.0.0.1 unless `--host` says otherwise; any other address needs Prefect's
API authentication: the secret (`user:password`) from a file only its owner reads (`--auth-file`)
or from PREFECT_SERVER_API_AUTH_STRING in the environment, never from the command line. The
server gets it as PREFECT_SERVER_API_AUTH_STRING, the workers and the deploy as
PREFECT_API_AUTH_STRING.

Environment: SLMFLOW_STATE_DIR (default infra/local/.state) holds pids, logs, PREFECT_HOME and
the PostgreSQL data folder; SLMFLOW_PREFECT_PORT sets the port (default 4200).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # prefect's CLI lives beside the interpreter running this
POOLS = {"local-cpu": "process", "local-gpu": "process", "azureml": "azureml"}
PG_PORT_OFFSET = 1000  # PostgreSQL listens on the Prefect port + this


def state_dir() -> Path:
    return Path(os.environ.get("SLMFLOW_STATE_DIR", REPO / "infra" / "local" / ".state")).resolve()


def stack_env(port: int, state: Path, host: str = "127.0.0.1", auth: str | None = None) -> dict[str, str]:
    """The environment every client of the stack (workers, deploy, the user's shell) shares."""
    env = dict(os.environ)
    env.pop("PREFECT_SERVER_API_AUTH_STRING", None)  # the server's side: only the server gets it
    env.update({
        "PREFECT_HOME": str(state / "prefect-home"),
        "PREFECT_API_URL": f"http://{client_host(host)}:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_URL": f"http://{client_host(host)}:{port}",
    })
    if auth is not None:
        env["PREFECT_API_AUTH_STRING"] = auth
    return env


def client_host(host: str) -> str:
    """The address this machine's clients use for a server listening on `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_auth(auth_file: str | None) -> str | None:
    """The API auth string: from `auth_file` (owner-only), else PREFECT_SERVER_API_AUTH_STRING."""
    if auth_file:
        path = Path(auth_file).expanduser()
        if not path.is_file():
            raise SystemExit(f"error: --auth-file {path}: no such file; write user:password into "
                             "it (one line) and chmod 600 it")
        if path.stat().st_mode & 0o077:
            raise SystemExit(f"error: --auth-file {path} is readable by others; chmod 600 {path}")
        secret = path.read_text().strip()
        if not secret:
            raise SystemExit(f"error: --auth-file {path} is empty; write user:password into it")
        return secret
    return os.environ.get("PREFECT_SERVER_API_AUTH_STRING") or None


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((client_host(host), port)) != 0


def _healthy(port: int, host: str = "127.0.0.1") -> bool:
    from slmflow.prefect_api import healthy

    return healthy(f"http://{client_host(host)}:{port}/api")


def _spawn(name: str, cmd: list[str], env: dict[str, str], state: Path,
           cwd: Path = REPO) -> int:
    """Start a process in its own group, log to state/<name>.log, record its pid."""
    log = open(state / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it open
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                            start_new_session=True)
    pids = _read_pids(state)
    pids[name] = proc.pid
    (state / "pids.json").write_text(json.dumps(pids, indent=1))
    return proc.pid


def _read_pids(state: Path) -> dict[str, int]:
    path = state / "pids.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _run(cmd: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=REPO, check=check, text=True, capture_output=True)


def start_postgres(port: int, state: Path, env: dict[str, str]) -> str:
    """Debian's PostgreSQL in state/postgres (initdb on first use); returns the database URL."""
    pg_bin = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not pg_bin:
        raise SystemExit("error: --postgres: no PostgreSQL server found under /usr/lib/postgresql; "
                         "install it with `apt-get install -y postgresql`")
    pg_bin_dir = pg_bin[-1]
    data = state / "postgres"
    pg_env = dict(env)
    owner = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use the `postgres` system user
        import pwd

        user = pwd.getpwnam("postgres")
        owner = {"user": user.pw_uid, "group": user.pw_gid}
        state.chmod(0o755)
    def pg(cmd: list[str]) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True, env=pg_env, check=False, **owner)
        if done.returncode != 0:
            who = " (it runs as user postgres: every folder above the state folder must be "
            who += "readable by it, e.g. SLMFLOW_STATE_DIR=/var/tmp/slmflow)" if owner else ""
            raise SystemExit(f"error: --postgres: {Path(cmd[0]).name} failed{who}: "
                             f"{(done.stderr or done.stdout).strip()[-500:]}")

    if not data.exists():
        data.mkdir(parents=True)
        if owner:
            os.chown(data, owner["user"], owner["group"])
        pg([str(pg_bin_dir / "initdb"), "-D", str(data), "-U", "prefect", "--auth=trust"])
    pg([str(pg_bin_dir / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"),
        "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {data}", "-w", "start"])
    exists = subprocess.run([str(pg_bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U",
                             "prefect", "-d", "postgres", "-tAc",
                             "SELECT 1 FROM pg_database WHERE datname='prefect'"],
                            capture_output=True, text=True, env=pg_env, check=False)
    if exists.stdout.strip() != "1":
        subprocess.run([str(pg_bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                        "prefect", "prefect"], check=True, capture_output=True, env=pg_env)
    (state / "postgres.json").write_text(json.dumps({"bin": str(pg_bin_dir), "data": str(data),
                                                     **owner}))
    return f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"


def stop_postgres(state: Path) -> None:
    info_path = state / "postgres.json"
    if not info_path.exists():
        return
    info = json.loads(info_path.read_text())
    owner = {k: info[k] for k in ("user", "group") if k in info}
    subprocess.run([str(Path(info["bin"]) / "pg_ctl"), "-D", info["data"], "-m", "fast", "-w",
                    "stop"], capture_output=True, check=False, **owner)
    info_path.unlink()


def _process_template(workdir: Path, env: dict[str, str], state: Path) -> list[str]:
    """Options giving a process pool `workdir` as its runs' working directory.

    Without one the process worker runs each flow in a temporary folder it deletes afterwards,
    so relative paths of a config (`output_dir: runs/...`) would land there and be lost.
    """
    got = _run([str(BIN / "prefect"), "work-pool", "get-default-base-job-template", "--type",
                "process"], env)
    template = json.loads(got.stdout)
    template["variables"]["properties"]["working_dir"]["default"] = str(workdir)
    path = state / "process-base-job-template.json"
    path.write_text(json.dumps(template, indent=1))
    return ["--base-job-template", str(path)]


def up(args: argparse.Namespace) -> int:
    state = state_dir()
    state.mkdir(parents=True, exist_ok=True)
    if _read_pids(state):
        print(f"error: a stack is already up (see {state / 'pids.json'}); stop it with "
              "infra/local/down", file=sys.stderr)
        return 2
    auth = read_auth(args.auth_file)
    if not is_loopback(args.host) and auth is None:
        print(f"error: --host {args.host} opens the Prefect API to other machines: turn on its "
              "authentication with --auth-file FILE (user:password, chmod 600) or "
              "PREFECT_SERVER_API_AUTH_STRING in the environment", file=sys.stderr)
        return 2
    if not _port_free(args.port, args.host):
        print(f"error: port {args.port} on {client_host(args.host)} is taken; pass --port N or "
              "stop what uses it", file=sys.stderr)
        return 2
    env = stack_env(args.port, state, args.host, auth)
    if args.postgres:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = start_postgres(
            args.port + PG_PORT_OFFSET, state, env)
    if not _start_server(args, env, state, auth):
        down(args)
        return 1
    _create_pools(Path(args.workdir).resolve(), env, state)
    deploy_args = [a for item in args.deploy_config for a in ("--config", item)]
    deployed = _run([str(sys.executable), str(REPO / "deployments" / "deploy.py"), *deploy_args],
                    env, check=False)
    print(deployed.stdout.rstrip())
    if deployed.returncode != 0:
        print(deployed.stderr, file=sys.stderr)
        down(args)
        return deployed.returncode
    for pool in ([] if args.no_worker else args.worker_pool or ["local-cpu"]):
        _spawn(f"worker-{pool}", [str(BIN / "prefect"), "worker", "start", "--pool", pool,
                                  "--name", f"slmflow-{pool}"], env, state, cwd=Path(args.workdir))
        print(f"worker: pool {pool} (log {state / f'worker-{pool}.log'})")
    _write_shell_env(state, env, args.auth_file if auth else None)
    print(f"\nUI: {env['PREFECT_UI_URL']}\nIn your shell: source {state / 'env'}\n"
          "Trigger: prefect deployment run 'slmflow-pipeline/local-cpu' --watch")
    return 0


def _start_server(args: argparse.Namespace, env: dict[str, str], state: Path,
                  auth: str | None) -> bool:
    server_env = dict(env)
    if auth is not None:
        server_env["PREFECT_SERVER_API_AUTH_STRING"] = auth
    _spawn("server", [str(BIN / "prefect"), "server", "start", "--host", args.host,
                      "--port", str(args.port)], server_env, state)
    deadline = time.monotonic() + args.timeout
    while not _healthy(args.port, args.host):
        if time.monotonic() > deadline:
            print(f"error: the server did not answer within {args.timeout} s; see "
                  f"{state / 'server.log'}", file=sys.stderr)
            return False
        time.sleep(0.5)
    where = f"http://{client_host(args.host)}:{args.port}"
    others = "" if is_loopback(args.host) else (
        f"; other machines: http://<this machine's address>:{args.port}/api with "
        "PREFECT_API_AUTH_STRING (API authentication is on)")
    print(f"server: {where} (log {state / 'server.log'}){others}")
    return True


def _create_pools(workdir: Path, env: dict[str, str], state: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    for pool, kind in POOLS.items():
        template = _process_template(workdir, env, state) if kind == "process" else []
        made = _run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", kind,
                     "--overwrite", *template], env, check=False)
        if made.returncode != 0:
            reason = (made.stderr or made.stdout).strip().splitlines()[-1:] or ["?"]
            print(f"pool {pool}: not created ({kind} worker type unavailable: {reason[0]})")
        else:
            print(f"pool {pool}: {kind}" + (f", runs in {workdir}" if template else ""))


def _write_shell_env(state: Path, env: dict[str, str], auth_file: str | None) -> None:
    """state/env for `source`: the API URL, and the auth string read from its file (never copied)."""
    lines = [f"export PREFECT_API_URL={env['PREFECT_API_URL']}"]
    if auth_file:
        lines.append(f'export PREFECT_API_AUTH_STRING="$(cat {Path(auth_file).expanduser().resolve()})"')
    elif "PREFECT_API_AUTH_STRING" in env:
        lines.append("# and PREFECT_API_AUTH_STRING: the value of PREFECT_SERVER_API_AUTH_STRING")
    path = state / "env"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


def down(args: argparse.Namespace | None = None) -> int:
    state = state_dir()
    pids = _read_pids(state)
    # workers first (they report their runs' end), the server last
    for name in sorted(pids, key=lambda n: n == "server"):
        _stop_group(pids[name])
        print(f"stopped {name} ({pids[name]})")
    (state / "pids.json").unlink(missing_ok=True)
    stop_postgres(state)
    return 0


def _stop_group(pid: int, grace: float = 15.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start server, pools, deployments and a worker")
    p_up.add_argument("--port", type=int, default=int(os.environ.get("SLMFLOW_PREFECT_PORT", "4200")))
    p_up.add_argument("--postgres", action="store_true",
                      help="PostgreSQL (Debian's, in the state folder) instead of SQLite")
    p_up.add_argument("--host", default="127.0.0.1",
                      help="address the server listens on (default 127.0.0.1); any other needs "
                           "--auth-file or PREFECT_SERVER_API_AUTH_STRING")
    p_up.add_argument("--auth-file", metavar="FILE",
                      help="file holding the API auth string user:password (chmod 600)")
    p_up.add_argument("--no-worker", action="store_true", help="start no worker")
    p_up.add_argument("--worker-pool", action="append", choices=sorted(POOLS),
                      help="start a worker on this pool (repeatable: one worker per pool); "
                           "default local-cpu")
    p_up.add_argument("--workdir", default=str(REPO),
                      help="working directory of the runs of the local pools (relative paths of "
                           "a config, e.g. output_dir, resolve there); default: the repository")
    p_up.add_argument("--deploy-config", action="append", default=[], metavar="NAME=FILE",
                      help="start deployment NAME from FILE (passed to deployments/deploy.py)")
    p_up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the server")
    sub.add_parser("down", help="stop what `up` started")
    args = parser.parse_args(argv)
    if shutil.which("prefect", path=str(BIN)) is None:
        print(f"error: no prefect CLI beside {sys.executable}; run `make setup` first",
              file=sys.stderr)
        return 2
    return up(args) if args.command == "up" else down(args)


if __name__ == "__main__":
    sys.exit(main())
