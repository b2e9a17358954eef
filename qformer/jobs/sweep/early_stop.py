"""Mark results where the scheduler stopped a trial, so reports can say "stopped early".

Tune sets done=True both when a scheduler stops a trial and when the trainable finishes; only the
former reaches callbacks as a non-duplicate result with done=True. ASHA runs with
stop_last_trials=False (qformer.jobs.sweep.run), so every STOP is a rung cut: the trial's training was killed
before it ended (its MLflow run is then closed as KILLED), even when the cut came at the last rung.
The flag lands in the trial's last result (callbacks may edit it in place), which the experiment
state saves, so it survives a restore.
"""
from __future__ import annotations

from typing import Any

from ray.tune import Callback

FLAG = "stopped_early"


class EarlyStopMarker(Callback):
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get("done"):
            result[FLAG] = True
