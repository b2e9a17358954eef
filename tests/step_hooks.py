"""Step hooks the tests install in a training (qformer.train.loop_config.StepHook): injected failures.

In-process: `launch_training(cfg, step_hooks=[FailOnceAtStep(5, marker)])`. In a job started with
`ray job submit`: QFORMER_STEP_HOOKS=tests.step_hooks:fail_once_from_env plus QFORMER_FAIL_ONCE_AT_STEP
and QFORMER_FAIL_MARKER in the job's environment.
"""
from __future__ import annotations

import os
import signal
import time
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


@dataclass(frozen=True)
class KillOnceAtStep:
    """Rank `rank` SIGKILLs its own process once, after global step `step` (a Ray Train worker lost as an
    OOM kill or a dead host loses it: no exception, no cleanup). The marker holds the step and the time.

    `registered`: (Ray's checkpoint_manager_snapshot.json of the run, a step): first wait until the controller
    has registered that step's checkpoint. Ray registers a report at its next poll of the workers (every 2 s),
    so a process killed sooner takes the unregistered report with it and the restart starts further back."""

    step: int
    marker: str
    rank: int = 0
    registered: tuple[str, int] | None = None

    def __call__(self, step: int, rank: int) -> None:
        marker = Path(self.marker)
        if step != self.step or rank != self.rank or marker.exists():
            return
        if self.registered is not None:
            snapshot, registered_step = Path(self.registered[0]), f"step={self.registered[1]:08d}"
            deadline = time.monotonic() + 120
            while not (snapshot.is_file() and registered_step in snapshot.read_text()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no checkpoint of {registered_step} registered in {snapshot}")
                time.sleep(0.1)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{step} {time.time()}")
        os.kill(os.getpid(), signal.SIGKILL)


def fail_once_from_env() -> FailOnceAtStep:
    return FailOnceAtStep(int(os.environ["QFORMER_FAIL_ONCE_AT_STEP"]), os.environ["QFORMER_FAIL_MARKER"])
