"""Step hooks the tests install in a training (qformer.train.loop_config.StepHook): injected failures.

In-process: `launch_training(cfg, step_hooks=[FailOnceAtStep(5, marker)])`. In a job started with
`ray job submit`: QFORMER_STEP_HOOKS=tests.step_hooks:fail_once_from_env plus QFORMER_FAIL_ONCE_AT_STEP
and QFORMER_FAIL_MARKER in the job's environment.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class InjectedFailure(RuntimeError):
    """Raised once at a chosen step to exercise recovery (restart from the last checkpoint)."""


@dataclass(frozen=True)
class FailOnceAtStep:
    """Rank 0 raises once when the global step reaches `step`; the marker file makes it once per run, across
    Ray Train's restarts of the worker group."""

    step: int
    marker: str

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step or rank != 0:
            return
        marker = Path(self.marker)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(step))
        raise InjectedFailure(f"injected failure at global step {step}")


def fail_once_from_env() -> FailOnceAtStep:
    return FailOnceAtStep(int(os.environ["QFORMER_FAIL_ONCE_AT_STEP"]), os.environ["QFORMER_FAIL_MARKER"])
