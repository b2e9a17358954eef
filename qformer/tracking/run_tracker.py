"""MLflow tracking for training runs: one run per training, reopened (same run id) on resume.

The run's lifecycle lives on the driver (`qformer.tracking.training_run`): it creates or reopens the run
before Ray Train starts, so a worker restart or a re-launch keeps logging into the same run; rank 0 of the
workers logs metrics and plots into it by id. Everything goes through `MlflowClient` with an explicit
run id (no fluent global "active run"), which is what a Ray worker process needs. While the server is
unreachable, metric values wait in an outage buffer (`log_metrics_buffered`) and go out later.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from mlflow.entities import Metric, Param, RunTag

from qformer.core.logs import get_logger
from qformer.core.signals import on_stop_signal, stopped_by_signal, watch_stop_signal
from qformer.tracking.params import MAX_TAG_VALUE, PARAMS_PER_BATCH, source_tags
from qformer.tracking.plots import LOSS_CURVE_KEYS, loss_curve_png
from qformer.tracking.uri import ensure_experiment, mlflow_client

log = get_logger("tracking")

CONTINUES_TAG = "qformer.continues_run"  # a FINISHED run trained further: the new run names the old one
TRAIN_KEY_TAG = "qformer.train_key"  # storage_path/name of the Ray run; finds the run again on auto-resume


def artifact_files(uri: str, run_id: str, under: str, suffix: str = "") -> list[str]:
    """Artifact paths of a run under folder `under` (recursively) ending in `suffix`, sorted (logging order
    of steps for our step_<n> folders)."""
    client = mlflow_client(uri)
    found: list[str] = []

    def walk(path: str) -> None:
        for item in client.list_artifacts(run_id, path):
            if item.is_dir:
                walk(item.path)
            elif item.path.endswith(suffix):
                found.append(item.path)

    walk(under)
    return sorted(found)


def end_status(err: BaseException) -> str:
    """The MLflow status of a run its driver leaves by `err`: KILLED when it was stopped (Ctrl+C, SIGTERM
    from `ray job stop`), else FAILED."""
    stopped = isinstance(err, KeyboardInterrupt) or stopped_by_signal()
    return "KILLED" if stopped else "FAILED"



class RunTracker:
    """A handle on one MLflow run, by id; cheap to create in any process."""

    MAX_PENDING = 50_000  # metric values kept while the server is unreachable; older ones are dropped
    BATCH = 1000  # MLflow's limit of metrics per log_batch

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id
        self.client = mlflow_client(uri)
        self._pending: list = []  # mlflow.entities.Metric values not yet accepted by the server
        self.sent_late = 0  # values logged after an outage, with their original step and time
        self.dropped = 0  # values dropped because the buffer was full
        self._outage = False

    # ---- lifecycle (driver side)
    @classmethod
    def start(cls, uri: str, experiment_name: str, *, run_name: str | None = None, tags: Mapping[str, str] | None = None,
              params: Mapping[str, str] | None = None, config_yaml: str | None = None,
              parent_run_id: str | None = None) -> "RunTracker":
        """A new run: tags, immutable params (logged once: MLflow refuses changed values) and the resolved YAML."""
        exp_id = ensure_experiment(uri, experiment_name)
        all_tags = {k: str(v)[:MAX_TAG_VALUE] for k, v in {**source_tags(), **(tags or {})}.items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id  # nests the run under a Tune sweep's run in the UI
        run = mlflow_client(uri).create_run(exp_id, run_name=run_name, tags=all_tags)
        tracker = cls(uri, run.info.run_id)
        tracker._end_on_stop()
        if params:
            tracker.log_params(params)
        if config_yaml is not None:
            tracker.client.log_text(tracker.run_id, config_yaml, "config/resolved.yaml")
        return tracker

    @classmethod
    def reopen(cls, uri: str, run_id: str) -> "RunTracker":
        """Continue an existing run (resume / restart): same id, status back to RUNNING."""
        tracker = cls(uri, run_id)
        run = tracker.client.get_run(run_id)  # raises if the id is unknown in this store
        if run.info.status != "RUNNING":
            tracker.client.update_run(run_id, status="RUNNING")
        tracker._end_on_stop()
        return tracker

    def _end_on_stop(self) -> None:
        """An open run learns that a stop (SIGTERM: `ray job stop`), not a failure, ends it: it is closed KILLED
        as the signal arrives, before Ray's SIGKILL can leave it RUNNING (the launcher closes it again after)."""
        watch_stop_signal()
        on_stop_signal(f"MLflow run {self.run_id}", lambda: self.client.set_terminated(self.run_id, status="KILLED"))

    @staticmethod
    def status(uri: str, run_id: str) -> str:
        """RUNNING, FINISHED, FAILED or KILLED."""
        return mlflow_client(uri).get_run(run_id).info.status

    @classmethod
    def find_by_train_key(cls, uri: str, experiment_name: str, train_key: str) -> str | None:
        """The newest run tagged with this Ray run's storage/name (auto-resume before any checkpoint existed)."""
        client = mlflow_client(uri)
        exp = client.get_experiment_by_name(experiment_name)
        if exp is None:
            return None
        escaped = train_key.replace("'", "\\'")
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TRAIN_KEY_TAG}` = '{escaped}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def end(self, status: str = "FINISHED") -> None:
        on_stop_signal(f"MLflow run {self.run_id}", None)  # closed: a later SIGTERM must not make it KILLED
        self.client.set_terminated(self.run_id, status=status)

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    # ---- logging (rank 0 worker or driver)
    def log_params(self, params: Mapping[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i: i + PARAMS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_metrics_buffered(self, metrics: Mapping[str, float], step: int) -> bool:
        """Like log_metrics, but never raises: while the server is unreachable the values wait here (with
        their step and timestamp) and go out with the next call that gets through. False while buffering."""
        now = int(time.time() * 1000)
        new = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
        self._pending.extend(new)
        if len(self._pending) > self.MAX_PENDING:
            self.dropped += len(self._pending) - self.MAX_PENDING
            del self._pending[: len(self._pending) - self.MAX_PENDING]
        return self.flush(fresh=len(new))

    def flush(self, fresh: int = 0, wait_s: float = 0.0) -> bool:
        """Send the buffered metric values (the last `fresh` of them are this call's); True when none is left.
        wait_s: keep trying (every 2 s) that long while the server is unreachable (the end of a run)."""
        deadline = time.monotonic() + wait_s
        while not self._send(fresh) and time.monotonic() < deadline:
            time.sleep(2.0)
        return not self._pending

    def _send(self, fresh: int) -> bool:
        waited = len(self._pending) - fresh
        try:
            while self._pending:
                self.client.log_batch(self.run_id, metrics=self._pending[: self.BATCH])
                del self._pending[: self.BATCH]
        except Exception as err:  # noqa: BLE001 - any client/server failure: keep them for the next call
            if not self._outage:
                log.warning("MLflow at %s unreachable (%s): buffering metrics until it answers again",
                            self.uri, str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
            self._outage = True
            return False
        if self._outage:
            self.sent_late += max(0, waited)
            log.warning("MLflow at %s answers again: sent %d buffered metric values", self.uri, max(0, waited))
        self._outage = False
        return True

    @property
    def pending(self) -> int:
        return len(self._pending)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def log_loss_curve(self, keys: Iterable[str] = LOSS_CURVE_KEYS, artifact_file: str = "plots/loss_curve.png") -> None:
        """Re-draw the loss curves from the run's own metric history (so a resumed run's plot is complete)."""
        png = loss_curve_png({key: sorted(self.metric_history(key)) for key in keys})
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / Path(artifact_file).name
            target.write_bytes(png)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(target, None if parent == "." else parent)
