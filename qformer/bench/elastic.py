"""Elastic training on a simulated multi-node Ray cluster: node loss, node return, preemption notice.

Each scenario runs in a subprocess of its own (a `ray.cluster_utils.Cluster`: a head for the driver,
Train controller and Ray Data, and worker nodes with 1 CPU and a `qf_node` resource each, so one training
worker lands on each node), with the tiny model on generated shapes data and a sqlite MLflow store:

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
import threading
import time
from pathlib import Path
from typing import Any, Callable

NODE_RESOURCE = "qf_node"
OBJECT_STORE = 160 * 1024**2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenarios", nargs="+", default=["resize", "preempt"], choices=["resize", "preempt"])
    parser.add_argument("--quick", action="store_true", help="accepted for `bench all`; the scenarios are already small")
    parser.add_argument("--out-dir", default=None, help="results directory (default experiments/benchmarks/results)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per scenario")


def run(args: argparse.Namespace) -> dict:
    from qformer.bench.common import write_result

    results: dict[str, Any] = {}
    if "resize" in args.scenarios:
        results["resize"] = run_scenario("resize", timeout_s=args.timeout)
    if "preempt" in args.scenarios:
        results["preempt_with_checkpoint"] = run_scenario("preempt", {"preemption_checkpoint": True}, args.timeout)
        results["preempt_without_checkpoint"] = run_scenario("preempt", {"preemption_checkpoint": False}, args.timeout)
    summary = summarize(results)
    kept = ("error", "final_step", "mlflow_runs", "starts", "events", "recover_s", "steps_lost", "checkpoints")
    payload = {"summary": summary, "scenarios": {k: {f: v.get(f) for f in kept} for k, v in results.items()}}
    write_result("elastic", payload, args.out_dir)
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
        out["steps_lost_sigterm_resize_run"] = resize["steps_lost"].get("sigterm")
    for key, label in (("preempt_with_checkpoint", "with"), ("preempt_without_checkpoint", "without")):
        if results.get(key):
            out[f"steps_lost_sigterm_{label}_checkpoint"] = results[key]["steps_lost"].get("sigterm")
            out[f"sigterm_recover_s_{label}_checkpoint"] = results[key]["recover_s"].get("sigterm")
    return out


def run_scenario(name: str, options: dict | None = None, timeout_s: float = 600.0) -> dict:
    """Run one scenario in a fresh Python process (a Cluster cannot share a process with another Ray)."""
    with tempfile.TemporaryDirectory(prefix=f"qformer-elastic-{name}-") as work:
        out = Path(work) / "result.json"
        cmd = [sys.executable, "-m", "qformer.bench.elastic", name, work, json.dumps(options or {})]
        env = {**os.environ, "RAY_ADDRESS": ""}
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout_s)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(proc.stdout.splitlines()[-60:])
            raise RuntimeError(f"elastic scenario {name} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


# ---- inside the scenario process -----------------------------------------------------------------

class _Scenario:
    """A simulated cluster, a training run in a thread, and the observations the scenarios assert on."""

    def __init__(self, work: Path, nodes: int, run: dict):
        from ray.cluster_utils import Cluster

        from qformer.config import load_config_dict
        from qformer.data.synth import coco_caption_section, write_synthetic

        self.work = work
        data = work / "data"
        write_synthetic(data, n_train=32, n_val=4, n_test=4, image_size=64, captions_per_image=2)
        base = {"batch_size_train": 4, "batch_size_eval": 4, "init_lr": 1e-4, "min_lr": 1e-5, "warmup_lr": 0.0,
                "warmup_steps": 4, "max_epoch": 2, "log_freq": 1, "k_test": 2, "output_dir": str(work / "out"),
                "valid_splits": [], "test_splits": [], "amp": False, "keep_checkpoints": 50,
                "mlflow": {"tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment_name": "elastic"},
                "data": {"batch_size": 4, "num_cpus_per_task": 0.25},
                "ray": {"resources_per_worker": {"CPU": 0.5, NODE_RESOURCE: 1}, "max_failures": -1,
                        "use_gpu": False, "elastic_resize_interval_s": 5.0}}
        for key, value in run.items():
            base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        self.cfg = load_config_dict({"model": {"arch": "blip2", "model_type": "tiny", "num_query_token": 4,
                                               "max_txt_len": 16},
                                     "datasets": coco_caption_section(data), "run": base})
        self.uri = self.cfg.run.mlflow.tracking_uri
        self.debug = work / "debug"
        self.cluster = Cluster(initialize_head=True, connect=True, head_node_args={
            "num_cpus": 1, "object_store_memory": OBJECT_STORE, "include_dashboard": False})
        self.nodes = [self._add_node() for _ in range(nodes)]
        self.cluster.wait_for_nodes()
        self.events: list[dict] = []
        self.outcome: dict[str, Any] = {}
        self.thread: threading.Thread | None = None
        self.t0 = time.monotonic()

    def _add_node(self):
        return self.cluster.add_node(num_cpus=1, resources={NODE_RESOURCE: 1}, object_store_memory=OBJECT_STORE)

    def start(self) -> None:
        from qformer.train.launcher import launch_training

        def target() -> None:
            try:
                self.outcome["result"] = launch_training(self.cfg, extra_loop_config={"debug_dir": str(self.debug)})
            except BaseException as err:  # noqa: BLE001 - reported by finish()
                self.outcome["error"] = repr(err)

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    # -- observations
    def run_id(self) -> str | None:
        from mlflow.tracking import MlflowClient

        if not self.starts():  # the launcher creates the store (two processes creating its tables collide)
            return None
        client = MlflowClient(tracking_uri=self.uri)
        exp = client.get_experiment_by_name("elastic")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return runs[0].info.run_id if runs else None

    def history(self, key: str) -> list[tuple[int, float]]:
        from mlflow.tracking import MlflowClient

        run_id = self.run_id()
        if run_id is None:
            return []
        return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=self.uri).get_metric_history(run_id, key))

    def last_step(self) -> int:
        return max((s for s, _ in self.history("loss")), default=0)

    def registered(self, step: int) -> bool:
        """Ray Train has registered the checkpoint of `step` (a restart would resume from it or later)."""
        for path in (Path(self.cfg.run.output_dir) / "ray_results").glob("*/checkpoint_manager_snapshot.json"):
            try:
                if f"step={step:08d}" in path.read_text():
                    return True
            except OSError:
                continue
        return False

    def starts(self) -> list[dict]:
        path = self.debug / "starts.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def wait(self, predicate: Callable[[], Any], what: str, timeout_s: float = 240.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.thread is not None and not self.thread.is_alive():
                raise RuntimeError(f"the run ended while waiting for {what}: {self.outcome}")
            value = predicate()
            if value:
                return value
            time.sleep(0.25)
        raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def workers(self) -> list:
        import psutil

        found = []
        for proc in psutil.Process().children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def event(self, name: str, act: Callable[[], None]) -> None:
        """Do `act`, note the step reached before it, the group starts so far and the time."""
        before = self.last_step()
        starts = len(self.starts())
        act()
        self.events.append({"name": name, "t": time.monotonic() - self.t0, "last_step_before": before,
                            "starts_before": starts})

    def wait_restart(self, name: str) -> None:
        """Until a group started after event `name` has trained a step past the one reached before it."""
        ev = next(e for e in self.events if e["name"] == name)
        self.wait(lambda: len(self.starts()) > ev["starts_before"], f"a new worker group after {name}")
        self.wait(lambda: self.last_step() > ev["last_step_before"], f"a step after {name}")
        ev["recovered_t"] = time.monotonic() - self.t0

    def finish(self) -> dict:
        from mlflow.tracking import MlflowClient

        self.thread.join(600)
        result = self.outcome.get("result")
        client = MlflowClient(tracking_uri=self.uri)
        exp = client.get_experiment_by_name("elastic")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        starts = self.starts()
        loss = sorted((m.step, m.timestamp / 1000.0) for m in client.get_metric_history(runs[0].info.run_id, "loss")
                      ) if runs else []
        recover, lost = {}, {}
        for ev in self.events:
            if "recovered_t" in ev:
                recover[ev["name"]] = round(ev["recovered_t"] - ev["t"], 1)
            after = starts[ev["starts_before"]:]
            if after:  # steps trained (and logged) before the restart that it trains again
                reached = max((step for step, at in loss if at < after[0]["time"]), default=0)
                lost[ev["name"]] = max(0, reached - after[0]["step"])
        loss_steps = [step for step, _ in loss]
        return {
            "error": self.outcome.get("error") or (repr(result.error) if result and result.error else None),
            "final_step": int(result.metrics.get("step", -1)) if result else None,
            "mlflow_runs": len(runs), "status": runs[0].info.status if runs else None,
            "loss_steps": loss_steps, "events": self.events, "starts": starts, "recover_s": recover,
            "steps_lost": lost,
            "metrics": {k: self.history(k) for k in ("world_size", "global_batch", "accum_grad_iters", "worker_batch",
                                                     "lr", "preemption_checkpoint")},
            "checkpoints": _checkpoint_steps(Path(result.storage_path) / result.name) if result else [],
        }

    def close(self) -> None:
        import ray

        try:
            ray.shutdown()
        finally:
            self.cluster.shutdown()


def _checkpoint_steps(run_dir: Path) -> list[int]:
    steps = []
    for meta in sorted(run_dir.glob("*/meta.json")):
        try:
            steps.append(int(json.loads(meta.read_text())["step"]))
        except (OSError, ValueError, KeyError):
            continue
    return sorted(steps)


def _resize(work: Path, options: dict) -> dict:
    """Two nodes -> one (node removed mid-epoch) -> two (node added) -> SIGTERM to a worker."""
    scenario = _Scenario(work, nodes=2, run={"ray": {"num_workers": [1, 2]}, "save_freq_steps": 3, "max_epoch": 3})
    try:
        scenario.start()
        scenario.wait(lambda: scenario.registered(3) and len(scenario.starts()) == 1, "the step-3 checkpoint")
        scenario.event("node_removed", lambda: scenario.cluster.remove_node(scenario.nodes.pop()))
        scenario.wait_restart("node_removed")
        scenario.event("node_added", lambda: scenario.nodes.append(scenario._add_node()))
        scenario.wait(lambda: scenario.starts()[-1]["world"] == 2 and len(scenario.starts()) >= 3,
                      "the group to grow back to two workers")
        scenario.wait_restart("node_added")
        step = scenario.last_step()  # then a step whose next one has no periodic checkpoint (every 3)
        scenario.wait(lambda: scenario.last_step() > step and scenario.last_step() % 3 == 1, "a step on the grown group")
        scenario.event("sigterm", lambda: scenario.workers()[0].send_signal(signal.SIGTERM))
        scenario.wait_restart("sigterm")
        return scenario.finish()
    finally:
        scenario.close()


def _preempt(work: Path, options: dict) -> dict:
    """A fixed 2-worker run, a checkpoint every 5 steps; SIGTERM to one worker 3 steps past a checkpoint."""
    keep = bool(options.get("preemption_checkpoint", True))
    scenario = _Scenario(work, nodes=2, run={"ray": {"num_workers": 2}, "save_freq_steps": 5, "max_epoch": 2,
                                             "elastic": {"preemption_checkpoint": keep}})
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
                       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       # after a node loss Ray's first restart may still count the lost node and wait for
                       # it this long (default 60 s) before trying the smaller size
                       "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("QFORMER_HOME", str(work / "home"))
    temp = tempfile.mkdtemp(prefix="qfe", dir="/tmp")  # short: Ray's socket paths are length-limited
    os.environ["RAY_TMPDIR"] = temp
    try:
        from qformer.logging_setup import setup_logging

        setup_logging()
        result = SCENARIOS[name](work, options)
        (work / "result.json").write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
