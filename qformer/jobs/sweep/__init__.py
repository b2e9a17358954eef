"""Hyper-parameter sweeps: sweep-file schema, search spaces, the Tune trial, MLflow plumbing, reports.

`qformer.jobs.sweep.run.run_sweep` ties the pieces together; `qformer tune` is its command line.
"""
