"""`qformer eval --benchmark paper`: a checkpoint's retrieval on COCO 5k test and Flickr30K 1k test, as the
BLIP-2 paper's Table 5 lays it out (TR@1/5/10 and IR@1/5/10 per set).

The experiment config gives the model, the run's Ray, AMP and MLflow settings and the data root; its data
sets are replaced by LAVIS's `coco_retrieval` and `flickr30k` (their packaged defaults: LAVIS's annotation
files and paths under the data root) and the re-rank depth by LAVIS's BLIP-2 retrieval configs' (k_test 128
for both: lavis/projects/blip2/eval/ret_{coco,flickr}_eval.yaml). Both splits are evaluated in one
`qformer eval` run (one MLflow run); the table is printed, logged to that run (metrics and
`retrieval/paper_table.{json,txt}`) and written as JSON beside the checkpoint.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from qformer.config import load_config_dict

log = logging.getLogger("qformer.evaluate")

SETS = {"coco_retrieval/test": "COCO 5k test", "flickr30k/test": "Flickr30K 1k test"}
K_TEST = 128  # LAVIS's BLIP-2 retrieval eval configs, COCO and Flickr30K alike
COLUMNS = {"TR@1": "txt_r1", "TR@5": "txt_r5", "TR@10": "txt_r10", "IR@1": "img_r1", "IR@5": "img_r5",
           "IR@10": "img_r10"}
TABLE_FILE = "retrieval_paper.json"


def benchmark_config(cfg: Any):
    """`cfg` with its data sets replaced by the paper's two evaluation sets, validated again: an entry the
    config (or --options datasets.flickr30k...) already gives for one of them is kept, else its defaults."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    given = dict(plain["datasets"])
    coco = given.get("coco_caption") or {}
    if "coco_retrieval" not in given and ((coco.get("build_info") or {}).get("annotations") or {}).get("test"):
        given["coco_retrieval"] = {"build_info": coco["build_info"]}  # the training config's own COCO paths
    plain["datasets"] = {name: given.get(name, {}) for name in (s.split("/")[0] for s in SETS)}
    plain["run"].update({"k_test": K_TEST, "train_splits": [], "valid_splits": [], "test_splits": list(SETS),
                         "train_dataset_ratios": None})
    return load_config_dict(plain)


def paper_table(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """{set: {TR@1: ..., IR@10: ...}} from `qformer eval`'s "<split>/<metric>" keys."""
    return {title: {col: float(metrics[f"{split}/{key}"]) for col, key in COLUMNS.items()}
            for split, title in SETS.items() if f"{split}/txt_r1" in metrics}


def format_table(table: dict[str, dict[str, float]]) -> str:
    width = max(len(t) for t in table)
    head = f"{'':{width}}  " + "  ".join(f"{c:>6}" for c in COLUMNS)
    rows = [f"{title:{width}}  " + "  ".join(f"{row[c]:6.1f}" for c in COLUMNS) for title, row in table.items()]
    return "\n".join([head, *rows])


def write_beside(checkpoint: str | Path, payload: dict) -> Path | None:
    """The table as JSON beside the checkpoint (in a checkpoint directory, or next to a .pth file)."""
    path = Path(checkpoint).expanduser()
    target = (path if path.is_dir() else path.parent) / (TABLE_FILE if path.is_dir() else f"{path.stem}.{TABLE_FILE}")
    try:
        target.write_text(json.dumps(payload, indent=2, sort_keys=True))
    except OSError as err:  # e.g. a read-only copy of LAVIS's weights: the table is printed and in MLflow anyway
        log.warning("could not write %s: %s", target, err)
        return None
    return target


def run_paper_benchmark(cfg: Any, checkpoint: str, *, local: bool = False, track: bool = True) -> dict[str, Any]:
    """Evaluate, then print-ready table, its JSON file and (tracking on) the MLflow run holding both."""
    from qformer.jobs.eval_job import evaluate_checkpoint  # lazy: torch and Ray load after the config checks

    bench_cfg = benchmark_config(cfg)
    result = evaluate_checkpoint(bench_cfg, checkpoint, list(SETS), track=track, local=local)
    table = paper_table(result.metrics)
    text = format_table(table)
    payload = {"checkpoint": str(Path(checkpoint).expanduser().resolve()), "k_test": K_TEST, "table": table,
               "model_type": str(cfg.model.get("model_type")), "image_size": int(cfg.model.image_size),
               "mlflow_run_id": result.mlflow_run_id}
    written = write_beside(checkpoint, payload)
    if result.mlflow_run_id:
        from qformer.tracking.run_tracker import RunTracker  # lazy: MLflow only when tracking

        tracker = RunTracker(result.tracking_uri, result.mlflow_run_id)
        tracker.log_text(json.dumps(payload, indent=2, sort_keys=True), "retrieval/paper_table.json")
        tracker.log_text(text + "\n", "retrieval/paper_table.txt")
    return {"table": table, "text": text, "json": str(written) if written else None, "result": result}
