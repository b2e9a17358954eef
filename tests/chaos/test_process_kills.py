"""Killed processes: a DDP Ray Train worker (SIGKILL) and the `qformer train` driver (SIGINT, SIGKILL)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from omegaconf import OmegaConf

from chaos_helpers import ChaosRow, chaos_cfg, client_for, latest_run_id, loss_steps, uninterrupted_lrs, wait_for
from helpers import short_tmp_dir
from step_hooks import KillOnceAtStep

pytestmark = [pytest.mark.chaos, pytest.mark.ray, pytest.mark.slow]
QFORMER = Path(sys.executable).parent / "qformer"


def test_sigkilled_ddp_worker_restarts_the_group_from_the_last_checkpoint(ray_cluster, tiny_bert, shapes, tmp_path,
                                                                         chaos_report):
    """Two DDP workers (gloo); rank 1 SIGKILLs itself after step 3, once Ray has registered the step-2
    checkpoint (no exception, no cleanup: an OOM kill).
    Ray Train restarts the group from the step-2 checkpoint: the run ends at its planned step in one MLflow
    run, each step logged once, the LR on schedule, the ranks' weights identical and their data disjoint."""
    from qformer.jobs.train_job import launch_training, run_name, storage_path
    from qformer.train.checkpoint import load_file

    cfg = chaos_cfg(tiny_bert, shapes, tmp_path, "worker_kill", {
        "batch_size_train": 2, "max_steps_per_epoch": 6,
        "ray": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}, "max_failures": 1, "use_gpu": False}})
    debug = tmp_path / "debug"  # each rank's batches and weights, as the restarted group trained them
    cfg.run.data.audit_dir = str(debug)
    marker = tmp_path / "killed_once"
    snapshot = Path(storage_path(cfg)) / run_name(cfg) / "checkpoint_manager_snapshot.json"
    result = launch_training(cfg, step_hooks=[KillOnceAtStep(3, str(marker), rank=1, registered=(str(snapshot), 2))])
    killed_step, killed_t = marker.read_text().split()
    assert killed_step == "3"  # the kill did happen, once
    uri = cfg.run.mlflow.tracking_uri
    client = client_for(uri)
    run_id = result.mlflow_run_id
    assert result.error is None and result.metrics["step"] == 6
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.tags["ray_num_workers"] == "2"
    assert len(client.search_runs([client.get_experiment_by_name("chaos").experiment_id])) == 1
    assert loss_steps(uri, run_id) == [1, 2, 3, 4, 5, 6]  # each step once: the re-run step 3 is not logged twice
    lr = {m.step: m.value for m in client.get_metric_history(run_id, "lr")}
    assert lr == pytest.approx(uninterrupted_lrs(cfg, 6))

    ranks = [json.loads((debug / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["global_step"] == 6 for r in ranks)
    # restarted from the step-2 checkpoint (checkpoints every 2 steps): the new group trained steps 3-6
    resumed_from = 6 - len(ranks[0]["batches"])
    assert resumed_from == 2 and len(ranks[1]["batches"]) == 4
    assert not set(ranks[0]["batches"]) & set(ranks[1]["batches"])  # each worker saw its own shard
    assert ranks[0]["weights"].keys() == ranks[1]["weights"].keys()
    for key, value in ranks[0]["weights"].items():  # DDP all-reduced gradients: identical weights
        assert value == pytest.approx(ranks[1]["weights"][key], rel=1e-6, abs=1e-6), key
    final = Path(result.checkpoint_path)
    assert final.parent == Path(result.storage_path) / result.name  # persisted to Ray storage
    state = load_file(final)
    assert state["step"] == 6 and state["epoch_complete"]

    # seconds from the kill to the first step past it (step 3 keeps the values logged before the kill)
    [step4] = [m for m in client.get_metric_history(run_id, "loss") if m.step == 4]
    recover_s = step4.timestamp / 1000 - float(killed_t)
    assert recover_s > 0
    chaos_report(ChaosRow("SIGKILL of a Ray Train worker (rank 1 of 2)", "the group restarts from the last "
                          "checkpoint, one MLflow run, each step logged once, same LR", 0, int(killed_step) - resumed_from, 1,
                          recover_s))


def _ray_processes(temp_dir: str) -> list[psutil.Process]:
    names = (temp_dir, os.path.realpath(temp_dir))  # the link given to Ray, the folder it resolves
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(name in " ".join(proc.info["cmdline"] or []) for name in names):
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
        temp_dir = short_tmp_dir(tmp_path_factory, "qfc")  # Ray puts unix sockets under it
        temp_dirs.append(temp_dir)
        env = {**os.environ, "RAY_TMPDIR": temp_dir, "RAY_ADDRESS": ""}
        with open(tmp_path / f"driver-{len(temp_dirs)}.log", "w") as log:
            proc = subprocess.Popen([str(QFORMER), "train", "--cfg-path", str(exp)], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return proc, temp_dir

    def alive(value):  # a driver that died is a failure now, with its output, not a wait until the timeout
        if proc.poll() is not None and not value:
            raise AssertionError(f"the driver exited ({proc.returncode}):\n"
                                 + (tmp_path / f"driver-{len(temp_dirs)}.log").read_text()[-3000:])
        return value

    run_id, previous = None, 0
    for sig, after_step in ((signal.SIGINT, 3), (signal.SIGKILL, 5), (None, None)):
        t0 = time.monotonic()
        proc, temp_dir = launch()
        run_id = run_id or wait_for(lambda: alive(latest_run_id(uri)), 300, "the MLflow run")
        if previous:  # seconds from the re-launch to the first step past the interruption
            wait_for(lambda: alive(max(loss_steps(uri, run_id)) > previous), 300, "a step after the re-launch")
            rows[-1][-1] = time.monotonic() - t0
        if sig is None:
            break
        wait_for(lambda: alive(max(loss_steps(uri, run_id), default=0) >= after_step), 300, f"step {after_step}")
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
