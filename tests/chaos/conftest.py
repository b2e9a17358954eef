"""The chaos suite: real faults (killed processes, a killed tracking server, a full disk, a truncated
file, a diverging loss), each promise asserted with numbers. `pytest -m chaos` runs it alone.

Every test adds a row (fault, promise, steps lost, steps repeated, MLflow runs, seconds to recover) to
the session's report; the table is printed at the end of the run (tests/conftest.py, from every xdist
worker), and with QFORMER_CHAOS_REPORT=FILE the rows are written there as JSON (the reliability table in
docs/reliability.md comes from it).
"""
from __future__ import annotations

from dataclasses import asdict

import parallel
import pytest
from chaos_helpers import ChaosRow

CHAOS_ROWS: list[ChaosRow] = []


@pytest.fixture(scope="session")
def chaos_report():
    yield CHAOS_ROWS.append


def pytest_sessionfinish(session):
    if CHAOS_ROWS:
        parallel.hand_over(session.config, "chaos_rows", [asdict(r) for r in CHAOS_ROWS])
