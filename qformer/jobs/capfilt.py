"""`qformer data capfilt` as a job: connect to Ray, run CapFilt (qformer.data.capfilt) over the shards not yet
written, then the summary of the whole output folder (every shard's statistics, this run's and earlier
runs'): `capfilt_summary.json` beside the shards and, when tracking is on, an MLflow run with the same
figures as metrics and the JSON as an artifact."""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

from qformer.data.capfilt.pipeline import CapfiltSpec, load_processors, run_capfilt
from qformer.data.capfilt.ranking import ShardStats
from qformer.data.capfilt.shards import read_stats
from qformer.data.shard_set import expand_shard_set
from qformer.data.storage import join, write_bytes
from qformer.jobs.ray_cluster import cluster_gpus, connect_ray_at

SUMMARY = "capfilt_summary.json"
_PARAMS = set(CapfiltSpec().params())  # logged as params, not metrics


@dataclass(frozen=True)
class Tracking:
    uri: str
    experiment: str = "qformer-capfilt"


def capfilt_job(pattern: str | list[str], out_dir: str, spec: CapfiltSpec, *, fmt: str | None = None,
                endpoint: str | None = None, address: str | None = None, tracking: Tracking | None = None) -> dict:
    """Caption, rank and write; returns the summary (also written to `out_dir`/capfilt_summary.json)."""
    specs = [pattern] if isinstance(pattern, str) else list(pattern)
    shards = expand_shard_set("capfilt", specs, "--in", fmt=fmt, endpoint=endpoint)
    processors = load_processors(spec)  # a model that cannot be loaded here stops the job before Ray starts
    connect_ray_at(address)
    run = run_capfilt(shards, out_dir, spec, cluster_gpus(), processors)
    total = ShardStats()
    for name in run.names:
        total.add(run.stats.get(name) or read_stats(out_dir, name, shards.endpoint))
    summary = {"in": specs, "out": out_dir, **spec.params(), "shards": len(run.names),
               "shards_written": len(run.stats), "shards_skipped": len(run.skipped), "images_this_run": run.images,
               "seconds": round(run.seconds, 2),
               "images_per_s": round(run.images / run.seconds, 2) if run.seconds else None, **total.summary()}
    write_bytes(join(out_dir, SUMMARY), json.dumps(summary, indent=2).encode(), shards.endpoint)
    if tracking is not None:
        summary["mlflow_run_id"] = _track(tracking, summary)
    return summary


def _track(tracking: Tracking, summary: dict) -> str:
    from qformer.tracking.run_tracker import RunTracker  # lazy: MLflow only when tracking is on

    params = {k: str(summary[k]) for k in ("in", "out", *_PARAMS)}
    name = f"capfilt-{posixpath.basename(summary['out'].rstrip('/'))}"
    tracker = RunTracker.start(tracking.uri, tracking.experiment, run_name=name, tags={"qformer.kind": "capfilt"},
                               params=params)
    try:
        tracker.log_metrics(_numbers(summary), step=0)
        tracker.log_text(json.dumps(summary, indent=2), SUMMARY)
    except Exception:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return tracker.run_id


def _numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    """The summary's numbers as flat metric names (kept_score/p50, ...)."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in _PARAMS:
            out[f"{prefix}{key}"] = float(value)
    return out
