"""Elastic training on a simulated multi-node Ray cluster: node loss, node return, preemption notice.

Each scenario runs in a subprocess of its own, on a simulated cluster (qformer.bench.sim_cluster: one
training worker per worker node, the tiny model on generated shapes data, a sqlite MLflow store):

- `resize`: num_workers [1, 2], keep=global_batch; the second node is removed mid-epoch (the run goes on
  with one worker, two micro-batches per step), added back (the group grows at the next resize check),
  then a worker gets SIGTERM (a checkpoint at the next step, then a restart from it).
- `preempt`: a fixed 2-worker run with a checkpoint every 5 steps; one worker gets SIGTERM, with and
  without run.elastic.preemption_checkpoint.

Measured: steps lost per preemption (steps trained past the checkpoint the restart resumed from),
seconds from the node loss (and from its return) to the first step trained after it. The tests in
tests/chaos/test_elastic_cluster.py run the same scenarios and assert on what they record.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from qformer.bench.common import write_result
from qformer.bench.sim_cluster import SimulatedRun
from qformer.core.logs import setup_logging
from qformer.tracking.plots import world_size_png

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenarios", nargs="+", default=["resize", "preempt"], choices=["resize", "preempt"])
    parser.add_argument("--quick", action="store_true", help="accepted for `bench all`; the scenarios are already small")
    parser.add_argument("--out-dir", default=None, help="results directory (default experiments/benchmarks/results)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per scenario")


def run(args: argparse.Namespace) -> dict:
    results: dict[str, Any] = {}
    if "resize" in args.scenarios:
        results["resize"] = run_scenario("resize", timeout_s=args.timeout)
    if "preempt" in args.scenarios:
        results["preempt_with_checkpoint"] = run_scenario("preempt", {"preemption_checkpoint": True}, args.timeout)
        results["preempt_without_checkpoint"] = run_scenario("preempt", {"preemption_checkpoint": False}, args.timeout)
    summary = summarize(results)
    kept = ("error", "final_step", "mlflow_runs", "starts", "events", "recover_s", "steps_lost", "checkpoints")
    payload = {"summary": summary, "scenarios": {k: {f: v.get(f) for f in kept} for k, v in results.items()}}
    path = write_result("elastic", payload, args.out_dir)
    if "resize" in results:
        chart = path.with_name("elastic-latest.png")
        chart.write_bytes(resize_chart(results["resize"]))
        print(f"chart of the resize run: {chart}")
    for key, value in summary.items():
        print(f"{key:44s} {value}")
    return payload


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    resize = results.get("resize")
    if resize:
        out["node_loss_recover_s"] = resize["recover_s"].get("node_removed")
        out["node_return_grow_s"] = resize["recover_s"].get("node_added")
        out["sigterm_recover_s"] = resize["recover_s"].get("sigterm")
        out["steps_lost_node_loss"] = resize["steps_lost"].get("node_removed")
        out["steps_lost_node_return"] = resize["steps_lost"].get("node_added")
        out["steps_lost_sigterm_resize_run"] = resize["steps_lost"].get("sigterm")
    for key, label in (("preempt_with_checkpoint", "with"), ("preempt_without_checkpoint", "without")):
        if results.get(key):
            out[f"steps_lost_sigterm_{label}_checkpoint"] = results[key]["steps_lost"].get("sigterm")
            out[f"sigterm_recover_s_{label}_checkpoint"] = results[key]["recover_s"].get("sigterm")
    return out


def resize_chart(resize: dict) -> bytes:
    """The resize run's loss and MLflow world_size series, with its grow and preemption checkpoints."""
    metrics = resize["metrics"]
    marks = {"grow checkpoint": [s for s, _ in metrics.get("grow_checkpoint", [])],
             "preemption checkpoint": [s for s, _ in metrics.get("preemption_checkpoint", [])]}
    removed = [e["last_step_before"] for e in resize["events"] if e["name"] == "node_removed"]
    marks["node removed (after step)"] = removed
    return world_size_png(metrics["loss"], metrics["world_size"], marks,
                          title="qformer bench elastic: node lost, node back, SIGTERM")


def run_scenario(name: str, options: dict | None = None, timeout_s: float = 600.0, work_root: str | None = None) -> dict:
    """Run one scenario in a fresh Python process (a Cluster cannot share a process with another Ray).
    `options["model"]`: model keys over the tiny model's; `work_root`: where its temporary folder goes."""
    with tempfile.TemporaryDirectory(prefix=f"qformer-elastic-{name}-", dir=work_root) as work:
        out = Path(work) / "result.json"
        cmd = [sys.executable, "-m", "qformer.bench.elastic", name, work, json.dumps(options or {})]
        env = {**os.environ, "RAY_ADDRESS": ""}
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout_s)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(proc.stdout.splitlines()[-60:])
            raise RuntimeError(f"elastic scenario {name} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


def _resize(work: Path, options: dict) -> dict:
    """Two nodes -> one (node removed mid-epoch) -> two (node added) -> SIGTERM to a worker. The training holds
    at steps 4, 10 and 13 until each event has happened, so the events land at the same steps on any machine.
    The lost-sample ledger starts on the node that is removed; two training images are bad from the start and
    a third goes bad after the loss (35 images: every pass still has 8 steps of the global batch 8)."""
    scenario = SimulatedRun(work, nodes=2, run={"ray": {"num_workers": [1, 2]}, "save_freq_steps": 3, "max_epoch": 3},
                            model=options.get("model"), holds=(4, 10, 13), notice_holds=(10, 13), n_train=35,
                            ledger_on_last_node=True)
    try:
        for index in BAD_FROM_START:
            scenario.plant_bad_image(index)
        scenario.start()
        scenario.wait(lambda: scenario.registered(3) and len(scenario.starts()) == 1 and scenario.last_step() >= 4,
                      "the step-3 checkpoint and step 4")
        scenario.event("node_removed", lambda: scenario.cluster.remove_node(scenario.nodes.pop()))
        scenario.plant_bad_image(BAD_AFTER_LOSS)
        scenario.release(4)
        scenario.wait_restart("node_removed")
        # step 10 on one worker: the node comes back; the controller's grow notice reaches the held workers, which
        # then train step 11, checkpoint it and restart on two
        scenario.wait(lambda: scenario.last_step() >= 10, "step 10 on one worker")
        scenario.event("node_added", lambda: scenario.nodes.append(scenario.add_node()))
        scenario.wait(lambda: scenario.notice_seen(10), "the grow notice in the workers")
        scenario.release(10)
        scenario.wait_restart("node_added")
        scenario.wait(lambda: scenario.starts()[-1]["world"] == 2, "the group grown back to two workers")
        # step 13: its next step (14) has no periodic checkpoint (every 3), so the notice's own one is seen
        scenario.wait(lambda: scenario.last_step() >= 13, "step 13 on the grown group")
        scenario.event("sigterm", lambda: scenario.workers()[0].send_signal(signal.SIGTERM))
        scenario.wait(lambda: scenario.notice_seen(13), "the preemption notice in the worker")
        scenario.release(13)
        scenario.wait_restart("sigterm")
        return scenario.finish()
    finally:
        scenario.close()


BAD_FROM_START, BAD_AFTER_LOSS = (0, 1), 34  # training images, 2 captions each: 4 and 2 samples lost per pass


def _preempt(work: Path, options: dict) -> dict:
    """A fixed 2-worker run, a checkpoint every 5 steps; SIGTERM to one worker 3 steps past a checkpoint."""
    keep = bool(options.get("preemption_checkpoint", True))
    scenario = SimulatedRun(work, nodes=2, run={"ray": {"num_workers": 2}, "save_freq_steps": 5, "max_epoch": 2,
                                             "elastic": {"preemption_checkpoint": keep}}, model=options.get("model"))
    try:
        scenario.start()
        scenario.wait(lambda: scenario.last_step() >= 8, "step 8")
        scenario.event("sigterm", lambda: scenario.workers()[0].send_signal(signal.SIGTERM))
        scenario.wait_restart("sigterm")
        return scenario.finish()
    finally:
        scenario.close()


SCENARIOS = {"resize": _resize, "preempt": _preempt}


def _main(argv: list[str]) -> int:
    name, work, options = argv[0], Path(argv[1]), json.loads(argv[2]) if len(argv) > 2 else {}
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                       "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "TOKENIZERS_PARALLELISM": "false",
                       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("QFORMER_HOME", str(work / "home"))
    temp = tempfile.mkdtemp(prefix="qfe", dir="/tmp")  # short: Ray's socket paths are length-limited
    os.environ["RAY_TMPDIR"] = temp
    try:
        setup_logging()
        result = SCENARIOS[name](work, options)
        (work / "result.json").write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
