"""The chaos suite: real faults (killed processes, a killed tracking server, a full disk, a truncated
file, a diverging loss), each promise asserted with numbers. `pytest -m chaos` runs it alone.

Every test adds a row (fault, promise, steps lost, steps repeated, MLflow runs, seconds to recover) to
the session's report; with QFORMER_CHAOS_REPORT=FILE the rows are written there as JSON, and the table
is printed at the end of the session (the reliability table in docs/reliability.md comes from it).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
from chaos_helpers import ChaosRow

CHAOS_ROWS: list[ChaosRow] = []


@pytest.fixture(scope="session")
def chaos_report():
    yield CHAOS_ROWS.append
    if not CHAOS_ROWS:
        return
    path = os.environ.get("QFORMER_CHAOS_REPORT")
    if path:
        Path(path).write_text(json.dumps([asdict(r) for r in CHAOS_ROWS], indent=2))
    lines = ["| fault | promise | steps lost | steps repeated | MLflow runs | recover s |", "|---|---|---|---|---|---|"]
    for r in CHAOS_ROWS:
        cells = [r.fault, r.promise, r.steps_lost, r.steps_repeated, r.mlflow_runs,
                 None if r.recover_s is None else f"{r.recover_s:.1f}"]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    print("\nchaos suite:\n" + "\n".join(lines))
