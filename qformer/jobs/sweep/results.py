"""The sweep's results: one row per trial, the best trial, CSV, a plot and the printed table."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from qformer.jobs.sweep.spec import SweepSpec  # noqa: E402


@dataclass
class TrialRow:
    trial_id: str
    sampled: dict[str, Any]  # swept key -> value this trial ran with
    metric: float | None  # the tune metric at the trial's last report
    iterations: int  # reports Tune received (ASHA's default time unit)
    stopped_early: bool  # the scheduler stopped it before max_t
    status: str  # ok | error
    finished: bool = True  # ran to its end or was stopped by the scheduler (False: interrupted, or never started)
    checkpoint_path: str | None = None
    mlflow_run_id: str | None = None
    mlflow_status: str | None = None


def rows_from_result_grid(grid: Any, spec: SweepSpec) -> list[TrialRow]:
    """Flatten a ray.tune.ResultGrid (one Result per trial) into rows, in trial-id order."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        value = metrics.get(spec.metric)
        rows.append(TrialRow(
            trial_id=str(metrics.get("trial_id") or Path(str(result.path)).name),
            sampled={key: (result.config or {}).get(key) for key in spec.search_space},
            metric=float(value) if isinstance(value, (int, float)) else None,
            iterations=int(metrics.get("training_iteration") or 0),
            stopped_early=bool(metrics.get("stopped_early", False)),
            status="error" if result.error is not None else "ok",
            finished=bool(metrics.get("done")),  # Tune sets done on a trial's last result, not on an interrupted one
            checkpoint_path=metrics.get("checkpoint_path"),
        ))
    return sorted(rows, key=lambda r: r.trial_id)


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The finished or stopped trial with the best final metric (errored / NaN trials never win)."""
    scored = [r for r in rows if r.status == "ok" and r.metric is not None and math.isfinite(r.metric)]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.metric)


def table_columns(spec: SweepSpec) -> list[str]:
    return ["trial", *spec.search_space, spec.metric, "iterations", "stopped_early", "status", "mlflow_run_id"]


def row_values(row: TrialRow, spec: SweepSpec) -> list[Any]:
    return [row.trial_id, *(row.sampled.get(k) for k in spec.search_space), row.metric, row.iterations,
            row.stopped_early, row.status, row.mlflow_run_id or ""]


def write_csv(rows: list[TrialRow], spec: SweepSpec, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(table_columns(spec))
        writer.writerows(row_values(r, spec) for r in rows)
    return path


def format_table(rows: list[TrialRow], spec: SweepSpec, best: TrialRow | None = None) -> str:
    """Fixed-width text table; the best trial is marked with '*'."""
    header = ["", "trial", *(k.rsplit(".", 1)[-1] for k in spec.search_space), spec.metric, "iters", "stopped early", "status"]
    body = []
    for r in rows:
        body.append(["*" if best is not None and r.trial_id == best.trial_id else "", r.trial_id,
                     *(_fmt(r.sampled.get(k)) for k in spec.search_space), _fmt(r.metric), str(r.iterations),
                     "yes" if r.stopped_early else "no", r.status])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_axes(spec: SweepSpec) -> tuple[str, str | None]:
    """x: the learning-rate-like key (first continuous dim, run.init_lr if swept); colour: the next dim."""
    keys = list(spec.search_space)
    continuous = [k for k in keys if spec.search_space[k].produces_floats()]
    x_key = "run.init_lr" if "run.init_lr" in keys else (continuous or keys)[0]
    others = [k for k in keys if k != x_key]
    colour = "model.num_query_token" if "model.num_query_token" in others else (others[0] if others else None)
    return x_key, colour


def plot_metric(rows: list[TrialRow], spec: SweepSpec, path: Path) -> Path:
    """Metric vs the x key, one colour per value of the colour key; hollow markers = stopped early."""
    x_key, colour_key = plot_axes(spec)
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[Any, list[TrialRow]] = {}
    for r in rows:
        if r.metric is not None and isinstance(r.sampled.get(x_key), (int, float)):
            groups.setdefault(r.sampled.get(colour_key) if colour_key else None, []).append(r)
    cmap = plt.get_cmap("viridis", max(len(groups), 2))
    for i, (value, members) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        colour = cmap(i)
        for early in (False, True):
            pts = [r for r in members if r.stopped_early == early]
            if not pts:
                continue
            label = f"{colour_key.rsplit('.', 1)[-1]}={value}" if colour_key else "trials"
            ax.scatter([r.sampled[x_key] for r in pts], [r.metric for r in pts], s=50,
                       facecolors="none" if early else colour, edgecolors=colour,
                       label=label + (" (stopped early)" if early else ""))
    if spec.search_space[x_key].kind in ("loguniform", "qloguniform"):
        ax.set_xscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"{spec.metric} ({spec.mode})")
    ax.set_title(f"sweep {spec.name}")
    if groups:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
