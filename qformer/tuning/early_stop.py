"""Mark results where the scheduler stopped a trial before max_t, so reports can say "stopped early".

Tune sets done=True both when a scheduler stops a trial and when the trainable finishes; only the
former reaches callbacks as a non-duplicate result with done=True. The flag lands in the trial's last
result (callbacks may edit it in place), which the experiment state saves, so it survives a restore.
"""
from __future__ import annotations

from typing import Any

from ray.tune import Callback

FLAG = "stopped_early"


class EarlyStopMarker(Callback):
    def __init__(self, time_attr: str, max_t: int) -> None:
        self.time_attr = time_attr
        self.max_t = max_t

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        progress = result.get(self.time_attr)
        if result.get("done") and isinstance(progress, (int, float)) and progress < self.max_t:
            result[FLAG] = True
