"""`qformer config` through the installed console script, as a user runs it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
QFORMER = Path(sys.executable).parent / "qformer"
STAGE1 = "experiments/blip2/pretrain_stage1.yaml"


def qformer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(QFORMER), *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_config_prints_resolved_yaml():
    proc = qformer("config", "--cfg-path", STAGE1, "--options", "run.init_lr=2e-4", "model.model_type=tiny",
                   "model.image_size=224")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["arch"] == "blip2" and cfg["model"]["num_query_token"] == 8
    assert cfg["run"]["init_lr"] == 2e-4 and cfg["run"]["ray"]["num_workers"] == 16
    assert set(cfg) == {"model", "preprocess", "datasets", "run"}
    # the ignored LAVIS keys are reported on stderr, one line each
    ignored = [line for line in proc.stderr.splitlines() if "LAVIS key qformer ignores" in line]
    assert len(ignored) == 5 and any("run.device" in line for line in ignored)


def test_config_explain_names_each_layer():
    proc = qformer("config", "--cfg-path", STAGE1, "--explain", "--options", "run.seed", "7")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()

    def line(prefix: str) -> str:
        return next(l for l in lines if l.lstrip().startswith(prefix))

    assert line("seed: 7").endswith("# --options")
    assert line("init_lr:").endswith(f"# experiment: {STAGE1}")
    assert line("num_query_token: 32").endswith("# model defaults: qformer/config/defaults/models/blip2/pretrain.yaml")
    assert line("dataset_card:").endswith("# dataset defaults: qformer/config/defaults/datasets/coco_caption/default.yaml")
    assert line("amp_dtype: auto").endswith("# default")
    assert line("device: cuda").endswith("(ignored by qformer)")
    # still YAML: the comments do not change the values
    assert yaml.safe_load(proc.stdout)["run"]["seed"] == 7


def test_bad_key_exits_2_with_one_line():
    proc = qformer("config", "--cfg-path", STAGE1, "--options", "run.init_lrr=1e-4")
    assert proc.returncode == 2
    assert proc.stdout == ""
    errors = [l for l in proc.stderr.splitlines() if "LAVIS key" not in l]
    assert errors == ["qformer config: run.init_lrr: unknown key (from --options); did you mean run.init_lr?"]


def test_missing_file_exits_2():
    proc = qformer("config", "--cfg-path", "nope.yaml")
    assert proc.returncode == 2 and "experiment file not found: nope.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_command_does_not_import_torch():
    code = ("import sys; from qformer.cli import main; rc = main(['config', '--cfg-path', %r]); "
            "heavy = [m for m in ('torch', 'ray', 'transformers', 'timm', 'mlflow') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)" % STAGE1)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_config_keys_lists_the_schema():
    proc = qformer("config", "--keys")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert "required" in rows["model.arch"]
    assert "float (>0)" in rows["run.init_lr"] and "0.0001" in rows["run.init_lr"]
    assert "auto|true|false" in rows["run.ray.use_gpu"]
    assert "ignored (LAVIS)" in rows["run.device"]


def test_config_without_cfg_path_exits_2():
    proc = qformer("config")
    assert proc.returncode == 2 and "--cfg-path is required" in proc.stderr


def test_bare_qformer_prints_the_command_table_and_version_is_the_package_s(capsys):
    from importlib.metadata import version

    from qformer.cli import COMMANDS, main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS) and "usage: qformer" in out
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"qformer {version('qformer-platform')}"


def test_sub_command_help_keeps_its_example_lines(capsys):
    from qformer.cli import main

    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    out = capsys.readouterr().out
    # the module docstring's example commands stay one per line (argparse would run them into one paragraph)
    assert "\n  qformer tune --cfg-path experiments/sweeps/lr_queries.yaml --resume" in out
