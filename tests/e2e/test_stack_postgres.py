"""`infra/local/up --postgres`: the server on Debian's PostgreSQL instead of SQLite, then `down`."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")),
                    reason="no PostgreSQL server (apt-get install -y postgresql)")
def test_up_with_postgres_then_down(tmp_path):
    import os
    import shutil
    import tempfile

    # PostgreSQL refuses to run as root: as root, up runs it as user postgres, who cannot enter
    # pytest's private tmp folders; a world-readable one of our own instead
    tmp_path = Path(tempfile.mkdtemp(prefix="slmflow-pg-"))
    tmp_path.chmod(0o755)
    try:
        _up_and_down(tmp_path, os)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _up_and_down(tmp_path: Path, os) -> None:

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, SLMFLOW_STATE_DIR=str(tmp_path / "state"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    script = [sys.executable, str(REPO / "infra" / "local" / "stack.py")]
    try:
        up = subprocess.run([*script, "up", "--port", str(port), "--postgres", "--no-worker",
                             "--workdir", str(tmp_path / "work")],
                            env=env, capture_output=True, text=True, timeout=300, check=False)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "deployed slmflow-pipeline/local-cpu" in up.stdout
        pg = next(Path("/usr/lib/postgresql").glob("*/bin"))
        count = subprocess.run(
            [str(pg / "psql"), "-h", "127.0.0.1", "-p", str(port + 1000), "-U", "prefect", "-d",
             "prefect", "-tAc", "SELECT count(*) FROM deployment"],
            capture_output=True, text=True, timeout=60, check=True)
        assert int(count.stdout.strip()) >= 2  # the deployments live in PostgreSQL
        assert not (tmp_path / "state" / "prefect-home" / "prefect.db").exists()
    finally:
        subprocess.run([*script, "down"], env=env, capture_output=True, timeout=120, check=False)
    with socket.socket() as s:  # both servers are gone
        assert s.connect_ex(("127.0.0.1", port)) != 0
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port + 1000)) != 0
