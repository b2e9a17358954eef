"""MLflow tracking for training runs: one run per training, reopened (same run id) on resume.

The run's lifecycle lives on the driver (`qformer.train.launcher`): it creates or reopens the run before
Ray Train starts, so a worker restart or a re-launch keeps logging into the same run; rank 0 of the
workers logs metrics and plots into it by id. Everything goes through `MlflowClient` with an explicit
run id (no fluent global "active run"), which is what a Ray worker process needs.

Where the store is: run.mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else an embedded sqlite store
under QFORMER_HOME (never the process's working directory: under `ray job submit` that is a temporary
copy). A sqlite store on one machine is only reachable by workers on that machine; multi-node runs
need an `http://` tracking server.
"""
from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from qformer import paths
from qformer.logging_setup import get_logger

log = get_logger("tracking")

# MLflow limits (mlflow/utils/validation.py in 3.x)
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100
LOSS_CURVE_KEYS = ("loss", "loss_itc", "loss_itm", "loss_lm")
CONTINUES_TAG = "qformer.continues_run"  # a FINISHED run trained further: the new run names the old one
TRAIN_KEY_TAG = "qformer.train_key"  # storage_path/name of the Ray run; finds the run again on auto-resume


def resolve_tracking_uri(configured: str | None = None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or paths.default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return uri


def ui_hint(uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """How to look at the run: a local `mlflow ui` for a sqlite store, the server's page otherwise."""
    suffix = ""
    if experiment_id and run_id:
        suffix = f"/#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}{suffix}"
    return f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000{suffix}"


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"run.init_lr": "0.0001", ...} within MLflow's key/value limits.

    Lists become their string form; values longer than 6000 chars are cut (the full YAML is an artifact);
    keys longer than 250 chars are dropped rather than mangled.
    """
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name))
            continue
        if len(name) > MAX_KEY:
            continue
        text = "null" if value is None else str(value)
        out[name] = text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."
    return out


def git_commit() -> str:
    """The commit of the code that runs (QFORMER_GIT_COMMIT wins: a `ray job` working dir has no .git)."""
    if os.environ.get("QFORMER_GIT_COMMIT"):
        return os.environ["QFORMER_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    _create_sqlite_store(uri)
    return MlflowClient(tracking_uri=uri)


def sqlite_artifact_root(uri: str) -> Path | None:
    """Artifacts of a sqlite store live beside the db file: <dir>/artifacts (the embedded store's too)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).expanduser().parent / "artifacts"


def _create_sqlite_store(uri: str) -> None:
    """Create a new sqlite store with its artifact root beside it. Left to MlflowClient, the store's first
    user gives MLflow's Default experiment the artifact location <CWD>/mlruns: in a `ray job`, a temporary
    directory Ray deletes."""
    root = sqlite_artifact_root(uri)
    if root is None or Path(uri[len("sqlite:///"):]).expanduser().exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root.parent.mkdir(parents=True, exist_ok=True)
    SqlAlchemyStore(uri, root.resolve().as_uri()).engine.dispose()


def ensure_experiment(uri: str, name: str) -> str:
    """Experiment id, creating it on first use (artifacts next to a sqlite store, not in the CWD's ./mlruns)."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    root = sqlite_artifact_root(uri)
    if root is not None:
        location = (root / name.replace("/", "_")).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently (Tune trials): use theirs
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """For an http(s) tracking URI: the server answers /health, else ConfigError (one line, what to try).
    Called before Ray starts, so a server that is down costs seconds, not a cluster start-up."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    from qformer.config.errors import ConfigError

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as resp:
            if resp.status == 200:
                return
            problem = f"/health answered HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        problem = f"/health answered HTTP {err.code}"
    except OSError as err:
        problem = str(getattr(err, "reason", err))
    raise ConfigError(f"MLflow tracking server {uri} is not reachable ({problem}); start it, fix the URI "
                      "(or MLFLOW_TRACKING_URI), or train without tracking: --options run.mlflow.enabled=false",
                      "run.mlflow.tracking_uri")


def fail_fast_http() -> None:
    """In a training worker: one quick try per request instead of MLflow's ~4 minutes of retries, so an
    outage of the tracking server costs buffered metrics, not training time (see log_metrics_buffered)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


_stop_signals: set[int] = set()  # stop signals this process received (see watch_stop_signal)


def watch_stop_signal() -> None:
    """Note a SIGTERM (`ray job stop` sends it, and SIGKILL 3 s later), then hand it to the handler already
    set: ray.init's exits, which Ray re-raises inside ray.get as a plain SystemExit(1), so the exception
    alone cannot tell a stopped run from a broken one. Main thread only (where Python runs handlers)."""
    import signal
    import threading

    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or getattr(previous, "qformer_watch", False):
        return

    def note(signum, frame):
        _stop_signals.add(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)  # the default action, but through the `except`/`finally` blocks

    note.qformer_watch = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, note)


def end_status(err: BaseException) -> str:
    """The MLflow status of a run its driver leaves by `err`: KILLED when it was stopped (Ctrl+C, SIGTERM
    from `ray job stop`), else FAILED."""
    import signal

    stopped = isinstance(err, KeyboardInterrupt) or signal.SIGTERM in _stop_signals
    return "KILLED" if stopped else "FAILED"


class RunTracker:
    """A handle on one MLflow run, by id; cheap to create in any process."""

    MAX_PENDING = 50_000  # metric values kept while the server is unreachable; older ones are dropped
    BATCH = 1000  # MLflow's limit of metrics per log_batch

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id
        self.client = _client(uri)
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
        all_tags = {k: str(v)[:MAX_TAG_VALUE] for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id  # nests the run under a Tune sweep's run in the UI
        run = _client(uri).create_run(exp_id, run_name=run_name, tags=all_tags)
        tracker = cls(uri, run.info.run_id)
        watch_stop_signal()  # an open run must learn that a stop, not a failure, ends it
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
        watch_stop_signal()
        return tracker

    @staticmethod
    def status(uri: str, run_id: str) -> str:
        """RUNNING, FINISHED, FAILED or KILLED."""
        return _client(uri).get_run(run_id).info.status

    @classmethod
    def find_by_train_key(cls, uri: str, experiment_name: str, train_key: str) -> str | None:
        """The newest run tagged with this Ray run's storage/name (auto-resume before any checkpoint existed)."""
        client = _client(uri)
        exp = client.get_experiment_by_name(experiment_name)
        if exp is None:
            return None
        escaped = train_key.replace("'", "\\'")
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TRAIN_KEY_TAG}` = '{escaped}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    # ---- logging (rank 0 worker or driver)
    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i: i + PARAMS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_metrics_buffered(self, metrics: Mapping[str, float], step: int) -> bool:
        """Like log_metrics, but never raises: while the server is unreachable the values wait here (with
        their step and timestamp) and go out with the next call that gets through. False while buffering."""
        from mlflow.entities import Metric

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
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        drawn = False
        for key in keys:
            history = sorted(self.metric_history(key))
            if history:
                ax.plot([s for s, _ in history], [v for _, v in history], label=key)
                drawn = True
        ax.set_xlabel("global step (micro-batches)")
        ax.set_ylabel("loss")
        ax.set_title("training losses")
        if drawn:
            ax.legend()
        ax.grid(alpha=0.3)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / Path(artifact_file).name
            target.write_bytes(buf.getvalue())
            parent = str(Path(artifact_file).parent)
            self.log_artifact(target, None if parent == "." else parent)
