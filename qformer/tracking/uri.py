"""Where the MLflow store is and how to reach it: the tracking URI, its experiments, the server check.

The store: run.mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else an embedded sqlite store under
QFORMER_HOME (never the process's working directory: under `ray job submit` that is a temporary copy).
A sqlite store on one machine is only reachable by workers on that machine; multi-node runs need an
`http://` tracking server.
"""
from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient

from qformer.core import paths
from qformer.core.errors import ConfigError


def resolve_tracking_uri(configured: str | None = None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or paths.default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return uri


UI_PORT = 5000  # `qformer ui`'s default, MLflow's own

# MLflow 3's UI opens in its GenAI view (traces, judges) unless the page asks for the model-training one, or the
# user once picked it with the toggle (kept in the browser's local storage); the experiment tag alone does not do it
_TRAINING_VIEW = "?workflowType=machine_learning"


def run_page_path(experiment_id: str, run_id: str) -> str:
    """The UI's path of a run's page, in the model-training view."""
    return f"/#/experiments/{experiment_id}/runs/{run_id}{_TRAINING_VIEW}"


def runs_table_path(experiment_id: str) -> str:
    """The UI's path of an experiment's runs table, in the model-training view."""
    return f"/#/experiments/{experiment_id}/runs{_TRAINING_VIEW}"


def ui_hint(uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """How to look at the run: `qformer ui` (this interpreter's, so it works without an activated venv) for a
    local store, the server's page otherwise."""
    suffix = run_page_path(experiment_id, run_id) if experiment_id and run_id else ""
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}{suffix}"
    script = Path(sys.executable).with_name("qformer")
    command = f"{script if script.exists() else 'qformer'} ui"
    if uri != resolve_tracking_uri():
        command += f" --tracking-uri {uri}"
    return f"{command}   then open http://127.0.0.1:{UI_PORT}{suffix}"


def mlflow_client(uri: str) -> MlflowClient:
    """A client of the store at `uri` (a new sqlite store is created with its artifacts beside it)."""
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
    root.parent.mkdir(parents=True, exist_ok=True)
    SqlAlchemyStore(uri, root.resolve().as_uri()).engine.dispose()


# MLflow 3 opens an experiment without this tag in its GenAI view (traces, evaluations); this one selects the
# model-training view: the runs table, their metrics and artifacts
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def ensure_experiment(uri: str, name: str) -> str:
    """Experiment id, creating it on first use (artifacts next to a sqlite store, not in the CWD's ./mlruns)."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND[0]) is None:  # made before the tag (or by another tool)
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    root = sqlite_artifact_root(uri)
    if root is not None:
        location = (root / name.replace("/", "_")).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
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
