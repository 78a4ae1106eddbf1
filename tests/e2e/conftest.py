"""End-to-end fixtures: a temporary Prefect API on 127.0.0.1 for the whole session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's test harness: a throwaway SQLite database and API server, stopped afterwards."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
