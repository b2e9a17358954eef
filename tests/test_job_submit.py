"""What docs/cluster.md tells users to do, on this machine: `ray start --head` on loopback, then
`ray job submit --working-dir <repo> -- qformer train ...`, then the MLflow run the job produced.

The head is started with platform/ray/local-head.sh's own lines (docs/cluster.md, "A local Ray head without
Docker": activate the venv, then `ray start ...`), from a shell whose PATH lacks the venv, plus its own ports
and temp dir. It runs with Ray 2.60's token authentication, as the compose cluster does: a fresh token in
RAY_AUTH_TOKEN for `ray start` and `ray job submit` (nothing is written to ~/.ray/auth_token, which other
Ray users on this machine read). It is stopped by the process ids it started. Never `ray stop`: it ends
every Ray process on the machine. The compose file's `ray-head` health check runs against it too.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from helpers import free_port, short_tmp_dir, tiny_options

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the job driver must run this venv's python and `qformer`
PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "metrics-export-port", "node-manager-port", "object-manager-port",
              "runtime-env-agent-port")
HEAD_SCRIPT = REPO / "platform" / "ray" / "local-head.sh"  # docs/cluster.md: "A local Ray head without Docker"


def head_script_lines() -> tuple[str, str]:
    """The head script's venv activation and `ray start` lines, `.venv` pointing at this test's venv."""
    script = HEAD_SCRIPT.read_text()
    lines = [line.strip() for line in script.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert any(line.startswith("export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=") for line in lines), script
    activate = next(line for line in lines if line.endswith(".venv/bin/activate"))
    ray_start = next(line for line in lines if "ray start --head" in line)
    assert lines.index(activate) < lines.index(ray_start), "the venv must be active before `ray start`"
    venv = str(VENV_BIN.parent)
    return activate.replace(".venv", venv), ray_start.replace(".venv", venv)


@dataclass
class LoopbackRayHead:
    """A `ray start --head` cluster owned by this test module, found again by its temp dir and ports."""

    temp_dir: str
    ports: dict[str, int] = field(default_factory=lambda: {flag: free_port() for flag in PORT_FLAGS})
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    def start(self) -> None:
        # TOKENIZERS_PARALLELISM is left out so a job only has it from its runtime env (checked below).
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH", "TOKENIZERS_PARALLELISM"))}
        # A fresh shell: the venv is not active (as for a user who just opened a terminal).
        path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d) != VENV_BIN]
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                        PATH=os.pathsep.join(path))
        self.env.pop("VIRTUAL_ENV", None)
        activate, ray_start = head_script_lines()
        extra = ["--node-ip-address=127.0.0.1", "--include-dashboard=true", "--num-gpus=0",
                 f"--object-store-memory={256 * 1024**2}", f"--temp-dir={self.temp_dir}",
                 *(f"--{flag}={port}" for flag, port in self.ports.items())]
        script = f"{activate} && {ray_start} {' '.join(extra)}"
        proc = subprocess.run(["bash", "-c", script], env=self.env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, f"ray start failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        self._wait_for_job_api()

    def _wait_for_job_api(self, attempts: int = 120) -> None:
        """The job API lives in the dashboard, which may still be loading when `ray start` returns."""
        for _ in range(attempts):
            try:
                request = urllib.request.Request(f"{self.address}/api/version",
                                                 headers={"Authorization": f"Bearer {self.token}"})
                with urllib.request.urlopen(request, timeout=5) as resp:
                    if json.load(resp).get("ray_version"):
                        return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"Ray job API at {self.address} never answered")

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: those naming our temp dir or our client-server port, and their children.

        Ray's daemons are re-parented to init once `ray start` exits, so they are found by command line.
        """
        client_port = f"--port={self.ports['ray-client-server-port']}"
        roots = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.pid != os.getpid() and (
                self.temp_dir in cmdline or ("ray.util.client.server" in cmdline and client_port in cmdline)
            ):
                roots.append(proc)
        found = {p.pid: p for p in roots}
        for proc in roots:
            try:
                found.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        return list(found.values())

    def stop(self) -> list[int]:
        """Terminate this cluster's processes (then kill the stubborn ones); returns pids still alive."""
        procs = self.processes()
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)  # gcs_server and the monitor can ignore SIGTERM
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        return [p.pid for p in self.processes()]

    def submit_command(self, entrypoint: list[str], env_vars: dict[str, str] | None = None,
                       runtime_env_file: Path | None = None, submission_id: str | None = None) -> list[str]:
        """runtime_env_file (--runtime-env) replaces env_vars (--runtime-env-json); --working-dir wins over its
        working_dir."""
        runtime_env = (["--runtime-env", str(runtime_env_file)] if runtime_env_file
                       else ["--runtime-env-json", json.dumps({"env_vars": env_vars or {}})])
        named = ["--submission-id", submission_id] if submission_id else []
        return [str(VENV_BIN / "ray"), "job", "submit", "--address", self.address, "--working-dir", str(REPO),
                *named, *runtime_env, "--", *entrypoint]

    def submit(self, entrypoint: list[str], env_vars: dict[str, str] | None = None, timeout: int = 900,
               client_auth: dict[str, str] | None = None, runtime_env_file: Path | None = None,
               ) -> subprocess.CompletedProcess:
        """`ray job submit` as a user runs it; blocks until the job ends (exit 1 if it FAILED, else 0).

        client_auth replaces the submitting client's RAY_AUTH_* variables (default: the cluster's token).
        """
        env = self.env
        if client_auth is not None:
            env = {k: v for k, v in self.env.items() if not k.startswith("RAY_AUTH")} | client_auth
        return subprocess.run(self.submit_command(entrypoint, env_vars, runtime_env_file), env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=self.temp_dir)

    def job_status(self, submission_id: str) -> str:
        out = subprocess.run([str(VENV_BIN / "ray"), "job", "status", "--address", self.address, submission_id],
                             env=self.env, capture_output=True, text=True, timeout=120)
        # `ray job status` ends with "Job '<id>' succeeded|failed|was stopped" for a finished job
        match = re.search(r"Job '[^']+' (?:was )?(succeeded|failed|stopped)", out.stdout + out.stderr)
        assert match, out.stdout + out.stderr
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "stopped": "STOPPED"}[match.group(1)]


def submission_id(output: str) -> str:
    match = re.search(r"Job '([^']+)' submitted successfully", output)
    assert match, output[-3000:]
    return match.group(1)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    temp_dir = short_tmp_dir(tmp_path_factory, "qfjob")  # Ray puts unix sockets under it
    head = LoopbackRayHead(temp_dir=temp_dir)
    try:
        head.start()
        yield head
    finally:
        leftover = head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert leftover == [], f"Ray processes of the test cluster still running: {leftover}"


def test_job_runs_the_venv_python_with_stdlib_platform_and_submitted_code(ray_head):
    """The repo's platform/ dir travels with --working-dir and sits first on PYTHONPATH; with no
    __init__.py it must not shadow the stdlib module that Ray and MLflow import. Submitted with the
    project's job runtime env file, as docs/cluster.md shows."""
    probe = ("import os, platform, shutil, sys, qformer; platform.machine(); "
             "print('PROBE', platform.__file__, sys.executable, qformer.__file__, "
             "os.environ.get('TOKENIZERS_PARALLELISM'), shutil.which('qformer'), sep='|')")
    proc = ray_head.submit(["python", "-c", probe], runtime_env_file=REPO / "platform" / "ray" / "runtime_env.yaml")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    line = next(l for l in output.splitlines() if l.startswith("PROBE|"))
    platform_file, executable, qformer_file, tokenizers_env, qformer_script = line.split("|")[1:]
    assert tokenizers_env == "false", "platform/ray/runtime_env.yaml's env_vars reach the job"
    assert Path(platform_file).parent == Path(sysconfig.get_paths()["stdlib"])
    assert Path(executable).parent == VENV_BIN, "job drivers inherit the head's environment: start ray from the venv"
    assert qformer_script == str(VENV_BIN / "qformer"), "a job's `qformer` is the venv's (else: qformer: not found)"
    assert "working_dir_files" in qformer_file and ray_head.temp_dir in qformer_file, "submitted code wins"
    assert ray_head.job_status(submission_id(output)) == "SUCCEEDED"


def test_compose_head_health_check_passes_against_a_running_head(ray_head):
    """docker-compose.yml's `ray-head` health check, run as Docker would (no token), against this head:
    the workers wait for it (`service_healthy`), so a check that never passes keeps them from starting."""
    import yaml

    test = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["ray-head"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    code = test[3].replace("127.0.0.1:8265", f"127.0.0.1:{ray_head.ports['dashboard-port']}")
    assert code != test[3], "the check must target the dashboard port (8265)"
    env = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # What docs/cluster.md says about the endpoints: /api/healthz is the dashboard agent's, not the head's 8265.
    def status(port_flag: str, route: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ray_head.ports[port_flag]}{route}", timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code
    assert status("dashboard-port", "/api/gcs_healthz") == 200
    assert status("dashboard-port", "/api/healthz") == 404
    assert status("dashboard-agent-listen-port", "/api/healthz") == 200


@pytest.mark.parametrize("client_auth, error", [
    ({"RAY_AUTH_MODE": "disabled"}, "Missing authentication token"),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "nvalid authentication token"),
], ids=["no-token", "wrong-token"])
def test_submit_without_the_clusters_token_is_rejected(ray_head, client_auth, error):
    proc = ray_head.submit(["python", "-c", "print('must not run')"], client_auth=client_auth, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert error in output, output[-3000:]
    assert "must not run" not in output.replace("print('must not run')", "")


def test_failing_job_fails_the_submit_command(ray_head):
    proc = ray_head.submit(["qformer", "train", "--cfg-path", "experiments/does_not_exist.yaml"])
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # the job's own error names the missing file (not just Ray echoing the entrypoint)
    errors = [l for l in output.splitlines() if "does_not_exist.yaml" in l and "Running entrypoint" not in l]
    assert errors, output[-4000:]
    assert ray_head.job_status(submission_id(output)) == "FAILED"


def artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for info in client.list_artifacts(run_id, path):
        out.extend(artifact_paths(client, run_id, info.path) if info.is_dir else [info.path])
    return out


def tiny_training_job(bert: Path, home: Path, tracking_uri: str, experiment: str, *extra: str) -> dict:
    """Synthetic data under `home` (16 training images, one caption each, one image corrupt: the job skips
    and counts it) and the tiny `qformer train` job over it (one epoch: 15 samples, 3 steps of 4):
    entrypoint and env_vars."""
    from qformer.data.synth import write_synthetic

    data = home / "data" / "synth_shapes"
    write_synthetic(data, n_train=16, n_val=4, n_test=4, image_size=64, captions_per_image=1)
    sorted((data / "images" / "train").glob("*.jpg"))[0].write_bytes(b"not a jpeg")
    options = ["run.max_epoch=1", "run.batch_size_train=4", "run.batch_size_eval=4",
               "run.log_freq=1", "run.warmup_steps=1", "run.valid_splits=[]", "run.test_splits=[]",
               "run.ray.use_gpu=false", "run.ray.num_workers=1", "run.data.shuffle_buffer=0",
               "run.data.batch_size=4", f"run.mlflow.experiment_name={experiment}", *tiny_options(bert), *extra]
    return {"entrypoint": ["qformer", "train", "--cfg-path", "experiments/demo/tiny_shapes.yaml", "--options",
                           *options],
            "env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, "QFORMER_HOME": str(home),
                         "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                         "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}


def alive_actor_names(head: LoopbackRayHead) -> list[str]:
    proc = subprocess.run([str(VENV_BIN / "ray"), "list", "actors", "--address", head.address, "--format", "json",
                           "--filter", "state=ALIVE", "--limit", "10000"],
                          env=head.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [a.get("name") or "" for a in json.loads(proc.stdout)]


def assert_no_skipped_image_counter(head: LoopbackRayHead) -> None:
    """The job's skipped-image counter (a named actor its driver owns) ended with the job: none is left on
    the long-lived head to carry counts into the next job."""
    deadline = time.monotonic() + 60  # the owner's death reaches the GCS within moments
    while "qformer_skipped_images" in (names := alive_actor_names(head)) and time.monotonic() < deadline:
        time.sleep(2)
    assert "qformer_skipped_images" not in names, names


def _first_logged_run(client, experiment: str, db: Path, submit: subprocess.Popen):
    """The job's MLflow run once it has logged a training step (the loop runs inside trainer.fit())."""
    for _ in range(600):
        exp = client.get_experiment_by_name(experiment) if db.exists() else None
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and runs[0].data.metrics:
            return runs[0]
        assert submit.poll() is None, submit.communicate()[0][-4000:]
        time.sleep(1)
    raise AssertionError(f"no training step logged to {db} in 600 s")


def test_two_jobs_at_once_one_records_its_run_the_stopped_one_ends_killed(ray_head, tiny_bert, tmp_path):
    """Two training jobs share the cluster (half a CPU per Train worker). The first trains its epoch: one
    FINISHED MLflow run with its params, a loss per step, its own skipped-image count and a LAVIS checkpoint.
    The second runs until `ray job stop` SIGTERMs its driver (SIGKILL 3 s later): its run ends KILLED, not
    FAILED, and `ray job submit` exits 0 for a STOPPED job (only FAILED gives 1), as docs/cluster.md says."""
    import mlflow

    share = ["run.ray.resources_per_worker.CPU=0.5"]
    jobs, submits = {}, {}
    for name, extra in (("done", share), ("stop", [*share, "run.max_epoch=50", "run.max_steps_per_epoch=1000"])):
        uri = f"sqlite:///{tmp_path / name / 'mlflow' / 'mlflow.db'}"
        jobs[name] = tiny_training_job(tiny_bert, tmp_path / name / "qformer_home", uri, f"job-{name}", *extra)
        sid = f"{name}-{secrets.token_hex(4)}"
        submits[name] = (sid, subprocess.Popen(ray_head.submit_command(**jobs[name], submission_id=sid),
                                               env=ray_head.env, cwd=ray_head.temp_dir, text=True,
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        stop_client = mlflow.MlflowClient(tracking_uri=jobs["stop"]["env_vars"]["MLFLOW_TRACKING_URI"])
        running = _first_logged_run(stop_client, "job-stop", tmp_path / "stop" / "mlflow" / "mlflow.db",
                                    submits["stop"][1])
        assert running.info.status == "RUNNING"
        stop = subprocess.run([str(VENV_BIN / "ray"), "job", "stop", "--address", ray_head.address, submits["stop"][0]],
                              env=ray_head.env, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        outputs = {name: proc.communicate(timeout=600)[0] for name, (_, proc) in submits.items()}
    finally:
        for _, proc in submits.values():
            if proc.poll() is None:
                proc.kill()

    # the stopped job
    assert ray_head.job_status(submits["stop"][0]) == "STOPPED"
    assert submits["stop"][1].returncode == 0, outputs["stop"][-3000:]  # Ray's CLI: only FAILED exits 1
    assert stop_client.get_run(running.info.run_id).info.status == "KILLED", outputs["stop"][-3000:]

    # the finished job
    output = outputs["done"]
    assert submits["done"][1].returncode == 0, output[-6000:]
    assert ray_head.job_status(submits["done"][0]) == "SUCCEEDED"
    tracking_uri = jobs["done"]["env_vars"]["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("job-done")
    assert exp is not None, f"no MLflow experiment job-done in {tracking_uri}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    # params: the flattened resolved config, with the job's --options in it
    assert run.data.params["model.model_type"] == "tiny"
    assert run.data.params["run.batch_size_train"] == "4"
    assert run.data.params["run.mlflow.experiment_name"] == "job-done"
    # metrics: a loss logged at every step (log_freq=1) of the epoch's 3 steps (15 good samples, batch 4)
    loss_keys = [k for k in run.data.metrics if k.split("/")[-1] == "loss"]
    assert loss_keys, sorted(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, loss_keys[0])
    assert sorted({m.step for m in history}) == [1, 2, 3], history
    assert all(m.value == m.value and m.value > 0 for m in history), "finite positive losses"
    # the corrupt image, decoded once in the epoch: this job's count, not the other job's (each has its own)
    assert run.data.metrics["skipped_images"] == 1.0
    assert_no_skipped_image_counter(ray_head)  # both counters ended with their jobs (the stopped one's too)
    # checkpoint: LAVIS layout in an artifact, or its URI as a tag when storage is remote
    artifacts = artifact_paths(client, run.info.run_id)
    checkpoints = [a for a in artifacts if "checkpoint" in a.lower() and a.endswith(".pth")]
    assert checkpoints, f"no checkpoint artifact among {artifacts}"
    import torch

    local = client.download_artifacts(run.info.run_id, checkpoints[0], str(tmp_path / "downloaded"))
    state = torch.load(local, map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "config", "scaler", "epoch"} <= set(state), sorted(state)  # LAVIS layout
    assert state["model"] and all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
