"""Hyper-parameter sweeps: `qformer tune --cfg-path <sweep.yaml>` runs a Ray Tune experiment whose
trials each train the base experiment (the `qformer train` code path) with sampled values.

    from qformer.jobs.sweep.run import run_sweep
    from qformer.jobs.sweep.spec import load_sweep
    outcome = run_sweep(load_sweep("experiments/sweeps/lr_queries.yaml", ["tune.num_samples=2"]))

Order of work: validate every swept key (no Ray yet) -> MLflow parent run (behind a private server
when the store is sqlite) -> Tuner.fit() (or Tuner.restore(...) with resume=True) -> close orphaned
trial runs -> results CSV, plot and best config on disk and on the parent run -> printed table.
"""
from __future__ import annotations

from qformer.jobs.sweep.spec import SweepSpec
from qformer.jobs.sweep.validate import validate_sweep


def run_sweep(spec: SweepSpec, resume: bool = False, print_fn=print):
    """-> qformer.jobs.sweep.driver.SweepOutcome (the trials' rows, the best one, the files written)."""
    base = validate_sweep(spec)  # every swept key checked before Ray or MLflow start
    # lazy: a mistake in the sweep file shows in a second; the driver imports torch, Ray Tune and MLflow (~5 s)
    from qformer.jobs.sweep.driver import drive

    return drive(spec, base, resume, print_fn)
