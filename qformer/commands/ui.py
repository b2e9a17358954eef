"""Start the MLflow UI for the platform's tracking store on 127.0.0.1 and print the latest run's page.

The store: --tracking-uri, else --cfg-path's run.mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else the
platform's sqlite store under QFORMER_HOME (where `qformer demo` and `qformer train` log by default). A
configured tracking server (http://...) is not started again: its latest run's page is printed. Ctrl-C
stops the UI (and the server process under it).
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=None, help="MLflow store to show (sqlite:///..., or http://...)")
    parser.add_argument("--cfg-path", default=None, help="take the store from this experiment's run.mlflow.tracking_uri")
    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default 5000)")


def latest_run_page(ui_url: str, store_uri: str) -> str | None:
    """The UI page of the most recently started run in any experiment of the store (None: no run yet)."""
    # lazy: `qformer --help` imports every command module (see qformer/cli.py)
    from qformer.tracking.uri import mlflow_client, run_page_path

    client = mlflow_client(store_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    if not runs:
        return None
    run = runs[0]
    return ui_url.rstrip("/") + run_page_path(run.info.experiment_id, run.info.run_id)


def run(args: argparse.Namespace) -> int:
    # lazy: `qformer --help` imports every command module (see qformer/cli.py)
    import signal
    import threading

    from qformer.core import paths
    from qformer.tracking.server import local_tracking_server
    from qformer.tracking.uri import UI_PORT, resolve_tracking_uri, sqlite_artifact_root

    configured = args.tracking_uri
    if configured is None and args.cfg_path:
        from qformer.config import load_config

        configured = load_config(args.cfg_path).run.mlflow.get("tracking_uri")
    uri = resolve_tracking_uri(configured)
    if uri.startswith(("http://", "https://")):
        page = latest_run_page(uri, uri)
        print(f"MLflow server {uri} is already running elsewhere; latest run: {page or '(none yet)'}")
        return 0
    artifacts = sqlite_artifact_root(uri) or paths.qformer_home() / "mlflow" / "artifacts"
    log_path = paths.qformer_home() / "mlflow" / "ui.log"
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with local_tracking_server(uri, artifacts, log_path, port=args.port or UI_PORT) as url:
            page = latest_run_page(url, uri)
            print(f"MLflow UI for {uri}: {url}", flush=True)
            print(f"latest run: {page}" if page else "no run yet: train one (make demo) and reload", flush=True)
            print("Ctrl-C stops it.", flush=True)
            while not stop.wait(0.5):  # the signal handlers set it
                pass
    except RuntimeError as err:  # port in use, or the server did not come up (its log is named)
        print(f"qformer ui: {err}")
        return 1
    print("MLflow UI stopped.")
    return 0
