"""Killed processes: a Ray Train worker (SIGKILL) and the `qformer train` driver (SIGINT, SIGKILL)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from omegaconf import OmegaConf

from chaos_helpers import ChaosRow, chaos_cfg, client_for, latest_run_id, loss_steps, uninterrupted_lrs, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.ray, pytest.mark.slow]
QFORMER = Path(sys.executable).parent / "qformer"


def _train_workers() -> list[psutil.Process]:
    """This test session's Ray Train worker processes (descendants of this process: its private Ray)."""
    from qformer.bench.sim_cluster import train_worker_processes

    return train_worker_processes()


def test_sigkill_of_a_train_worker_restarts_from_the_last_checkpoint(ray_cluster, tiny_bert, shapes, tmp_path, chaos_report):
    from qformer.jobs.train_job import launch_training

    cfg = chaos_cfg(tiny_bert, shapes, tmp_path, "worker_kill", {
        "max_steps_per_epoch": 6, "ray": {"num_workers": 1, "resources_per_worker": {"CPU": 0.5}, "max_failures": 1,
                                          "use_gpu": False}})
    uri = cfg.run.mlflow.tracking_uri
    outcome: dict = {}
    debug = tmp_path / "debug"  # the restarted worker records the batches it trained
    cfg.run.data.audit_dir = str(debug)
    thread = threading.Thread(target=lambda: outcome.update(result=launch_training(cfg)), daemon=True)
    thread.start()
    run_id = wait_for(lambda: latest_run_id(uri), 300, "the MLflow run")
    wait_for(lambda: max(loss_steps(uri, run_id), default=0) >= 3, 300, "step 3 in MLflow")
    workers = _train_workers()
    assert len(workers) == 1, workers
    killed_after = max(loss_steps(uri, run_id))
    workers[0].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    steps_after_kill = lambda: max(loss_steps(uri, run_id)) > killed_after  # noqa: E731
    wait_for(steps_after_kill, 300, "a step after the restart")
    recover_s = time.monotonic() - killed_at
    thread.join(600)
    result = outcome["result"]
    assert result.error is None and result.metrics["step"] == 6 and result.mlflow_run_id == run_id
    client = client_for(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert loss_steps(uri, run_id) == [1, 2, 3, 4, 5, 6]  # each step once: the re-run steps are not logged twice
    lr = {m.step: m.value for m in client.get_metric_history(run_id, "lr")}
    assert lr == pytest.approx(uninterrupted_lrs(cfg, 6))
    exp = client.get_experiment_by_name("chaos").experiment_id
    assert len(client.search_runs([exp])) == 1
    resumed_from = 6 - len(json.loads((debug / "rank0.json").read_text())["batches"])
    assert resumed_from <= killed_after and resumed_from % 2 == 0  # a checkpoint step (or 0: none registered)
    chaos_report(ChaosRow("SIGKILL of a Ray Train worker", "restart from the last checkpoint, one MLflow run, "
                          "each step logged once, same LR", 0, killed_after - resumed_from, 1, recover_s))


def _ray_processes(temp_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_interrupted_or_killed_driver_resumes_with_the_same_command(tiny_bert, tmp_path, tmp_path_factory,
                                                                    chaos_report):
    """Also: the lost-sample count is the run's, not the launch's. One of 17 training images does not decode
    (2 captions lost), so the epoch is the 32 good rows in 8 steps; skipped_images ends at 2 however often
    the driver was stopped (each launch used to count from 0, so a resumed run ended below what it lost)."""
    import pyarrow as pa

    from qformer.data.epoch_rows import EpochShuffledRows
    from qformer.data.synth import write_synthetic

    data = tmp_path / "shapes"
    write_synthetic(data, n_train=17, n_val=4, n_test=4, image_size=64, captions_per_image=2)
    cfg = chaos_cfg(tiny_bert, data, tmp_path, "driver_kill", {"max_steps_per_epoch": 8, "ray": {"num_workers": 0},
                                                              "data": {"task_rows": 4}})
    # the image of the epoch's first row (rows: image i's captions are rows 2i, 2i+1): its read unit is trained
    # and done before the first checkpoint, so only a count kept in the checkpoint remembers its loss
    first = int(EpochShuffledRows(pa.table({"row": list(range(34))}), 4, (int(cfg.run.seed), 0)).order(0)[0])
    (data / "images" / "train" / f"train_{first // 2:06d}.jpg").write_bytes(b"not a jpeg")
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(OmegaConf.to_container(cfg, resolve=True)))
    uri = cfg.run.mlflow.tracking_uri
    rows = []

    temp_dirs: list[str] = []

    def launch() -> tuple[subprocess.Popen, str]:
        temp_dir = str(tmp_path_factory.mktemp("qfc"))  # a short name: Ray's socket paths are length-limited
        temp_dirs.append(temp_dir)
        env = {**os.environ, "RAY_TMPDIR": temp_dir, "RAY_ADDRESS": ""}
        proc = subprocess.Popen([str(QFORMER), "train", "--cfg-path", str(exp)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        return proc, temp_dir

    run_id, previous = None, 0
    for sig, after_step in ((signal.SIGINT, 3), (signal.SIGKILL, 5), (None, None)):
        t0 = time.monotonic()
        proc, temp_dir = launch()
        run_id = run_id or wait_for(lambda: latest_run_id(uri), 300, "the MLflow run")
        if previous:  # seconds from the re-launch to the first step past the interruption
            wait_for(lambda: max(loss_steps(uri, run_id)) > previous, 300, "a step after the re-launch")
            rows[-1][-1] = time.monotonic() - t0
        if sig is None:
            break
        wait_for(lambda: max(loss_steps(uri, run_id), default=0) >= after_step, 300, f"step {after_step}")
        previous = max(loss_steps(uri, run_id))
        proc.send_signal(sig)
        proc.wait(120)
        assert proc.returncode != 0
        # nothing of that Ray is left (SIGINT: shut down; SIGKILL: its daemons share the driver's fate)
        wait_for(lambda: not _ray_processes(temp_dir), 60, f"the Ray processes of the {sig.name}ed driver to end")
        rows.append([sig, previous, None])
    assert proc.wait(600) == 0
    for temp_dir in temp_dirs:  # the private Rays' session files (logs, sockets)
        shutil.rmtree(temp_dir, ignore_errors=True)
    client = client_for(uri)
    assert latest_run_id(uri) == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("chaos").experiment_id])) == 1
    assert loss_steps(uri, run_id) == list(range(1, 9))
    lr = {m.step: m.value for m in client.get_metric_history(run_id, "lr")}
    assert lr == pytest.approx(uninterrupted_lrs(cfg, 8))
    skipped = [m.value for m in sorted(client.get_metric_history(run_id, "skipped_images"), key=lambda m: m.step)]
    assert skipped[-1] == max(skipped) == 2, skipped  # as an uninterrupted epoch loses (each launch began at 0)
    assert client.get_run(run_id).data.metrics["skipped_images/undecodable"] == 2
    for sig, at, recover_s in rows:  # checkpoints every 2 steps: the steps past the last one are re-run
        chaos_report(ChaosRow(f"{sig.name} of the qformer train driver, same command again",
                              "resumes: same MLflow run, step count continues, no Ray process left", 0, at % 2, 1,
                              recover_s))
