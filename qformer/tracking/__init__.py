"""Everything MLflow: where the store is (`uri`), what a run records (`params`), the run tracker and its
outage buffer (`run_tracker`), plots (`plots`), one training's run lifecycle (`training_run`), a local
tracking server for sweeps (`server`) and a sweep's parent/child runs (`sweep_runs`)."""
