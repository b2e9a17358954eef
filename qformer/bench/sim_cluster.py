"""A simulated multi-node Ray cluster with one training run on it, and what the elastic scenarios observe.

`ray.cluster_utils.Cluster` starts a head (driver, Train controller, Ray Data) and worker nodes with 1 CPU
and a `qf_node` resource each; training workers ask for one `qf_node`, so each lands on its own node and a
removed node takes exactly one worker with it. The run is `launch_training` on the tiny model and generated
shapes data, in a thread, with a sqlite MLflow store; the observations come from MLflow, the run's
checkpoints and the training audit's `starts.jsonl` (one line per worker-group start, run.data.audit_dir).
Must run in a process without another Ray (qformer.bench.elastic starts one per scenario).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qformer.core.signals import preemption_requested
from qformer.train.grow_notice import grow_requested

NODE_RESOURCE = "qf_node"
OBJECT_STORE = 160 * 1024**2
HOLD_S = 300.0  # a hold is released by the scenario; this only bounds a scenario that died


@dataclass(frozen=True)
class HoldAt:
    """A step hook: after global step `step`, every rank waits until the file `release` exists, so a scenario's
    event lands at a known step however fast the machine trains. A rank that receives a preemption or grow
    notice while it waits creates `notice` (the event releases the hold only once the notice has arrived)."""

    step: int
    release: str
    notice: str = ""

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step:
            return
        deadline = time.monotonic() + HOLD_S
        while not Path(self.release).exists() and time.monotonic() < deadline:
            if self.notice and (preemption_requested() or grow_requested()):
                Path(self.notice).touch()
            time.sleep(0.1)


class SimulatedRun:
    """A simulated cluster, a training run in a thread, and the observations the scenarios assert on."""

    def __init__(self, work: Path, nodes: int, run: dict, model: dict | None = None, holds: tuple[int, ...] = (),
                 notice_holds: tuple[int, ...] = (), n_train: int = 32, ledger_on_last_node: bool = False):
        """`holds`: global steps the training waits at until `release(step)`; at `notice_holds` it also
        reports a preemption or grow notice (`notice_seen`). `ledger_on_last_node`: the lost-sample ledger
        starts on the last worker node (the one a scenario removes), not where Ray would put it."""
        # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
        from ray.cluster_utils import Cluster

        from qformer.config import load_config_dict
        from qformer.data.synth import coco_caption_section, write_synthetic

        self.work = work
        self.holds = tuple(HoldAt(step, str(work / f"release-{step}"),
                                  str(work / f"notice-{step}") if step in notice_holds else "") for step in holds)
        self.data = data = work / "data"
        write_synthetic(data, n_train=n_train, n_val=4, n_test=4, image_size=64, captions_per_image=2)
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
                                               "max_txt_len": 16, **(model or {})},
                                     "datasets": coco_caption_section(data), "run": base})
        self.uri = self.cfg.run.mlflow.tracking_uri
        self.debug = work / "debug"
        self.cfg.run.data.audit_dir = str(self.debug)
        self.cluster = Cluster(initialize_head=True, connect=True, head_node_args={
            "num_cpus": 1, "object_store_memory": OBJECT_STORE, "include_dashboard": False})
        self.nodes = [self.add_node() for _ in range(nodes)]
        self.cluster.wait_for_nodes()
        self.ledger = self.pin_ledger(self.nodes[-1]) if ledger_on_last_node else None
        self.events: list[dict] = []
        self.outcome: dict[str, Any] = {}
        self.thread: threading.Thread | None = None
        self.t0 = time.monotonic()

    def add_node(self):
        return self.cluster.add_node(num_cpus=1, resources={NODE_RESOURCE: 1}, object_store_memory=OBJECT_STORE)

    def pin_ledger(self, node):
        """The run's lost-sample ledger, created on `node` before the run (its driver's start finds and keeps it)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from qformer.data.stats import COUNTER_NAME, LossLedger

        actor = ray.remote(num_cpus=0)(LossLedger).options(
            name=COUNTER_NAME, scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote()
        ray.get(actor.total.remote())  # placed and running
        return actor

    def plant_bad_image(self, index: int) -> None:
        """Overwrite training image `index` with bytes no decoder reads (each pass then skips its captions)."""
        (self.data / "images" / "train" / f"train_{index:06d}.jpg").write_bytes(b"not an image" * 8)

    def start(self) -> None:
        # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
        from qformer.jobs.train_job import launch_training

        def target() -> None:
            try:
                self.outcome["result"] = launch_training(self.cfg, step_hooks=self.holds)
            except BaseException as err:  # noqa: BLE001 - reported by finish()
                self.outcome["error"] = repr(err)

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    # -- observations
    def run_id(self) -> str | None:
        from qformer.tracking.uri import mlflow_client  # lazy: `qformer --help` imports the bench suites

        if not self.starts():  # the launcher creates the store (two processes creating its tables collide)
            return None
        client = mlflow_client(self.uri)
        exp = client.get_experiment_by_name("elastic")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return runs[0].info.run_id if runs else None

    def history(self, key: str) -> list[tuple[int, float]]:
        from qformer.tracking.uri import mlflow_client  # lazy: `qformer --help` imports the bench suites

        run_id = self.run_id()
        if run_id is None:
            return []
        # by step, then in the order logged: where a restart logged a step again, the last value is the kept one
        history = mlflow_client(self.uri).get_metric_history(run_id, key)
        return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]

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

    def release(self, step: int) -> None:
        (self.work / f"release-{step}").touch()

    def notice_seen(self, step: int) -> bool:
        return (self.work / f"notice-{step}").exists()

    def workers(self) -> list:
        return train_worker_processes()

    def event(self, name: str, act: Callable[[], None]) -> None:
        """Do `act`, note the step reached before it, the group starts so far and the time."""
        before = self.last_step()
        starts = len(self.starts())
        skipped = self.history("skipped_images")
        act()
        self.events.append({"name": name, "t": time.monotonic() - self.t0, "last_step_before": before,
                            "starts_before": starts, "skipped_before": skipped[-1][1] if skipped else None})

    def wait_restart(self, name: str) -> None:
        """Until a group started after event `name` has trained a step past the one reached before it."""
        ev = next(e for e in self.events if e["name"] == name)
        self.wait(lambda: len(self.starts()) > ev["starts_before"], f"a new worker group after {name}")
        self.wait(lambda: self.last_step() > ev["last_step_before"], f"a step after {name}")
        ev["recovered_t"] = time.monotonic() - self.t0

    def finish(self) -> dict:
        from qformer.tracking.uri import mlflow_client  # lazy: `qformer --help` imports the bench suites

        self.thread.join(600)
        result = self.outcome.get("result")
        client = mlflow_client(self.uri)
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
                                                     "lr", "loss", "preemption_checkpoint", "grow_checkpoint",
                                                     "skipped_images")},
            "checkpoints": _checkpoint_steps(Path(result.storage_path) / result.name) if result else [],
        }

    def close(self) -> None:
        # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
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


def train_worker_processes() -> list:
    """Ray Train worker processes among this process's descendants (a private Ray's, or a simulated cluster's)."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found
