"""`qformer train` argument handling that needs no Ray: config errors stop before anything starts."""
from __future__ import annotations

from pathlib import Path

from qformer.cli import main


def test_train_bad_config_fails_with_the_key(tmp_path: Path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["train", "--cfg-path", str(missing)]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {arch: blip2, model_type: tiny}\nrun: {init_lr: fast}\n")
    assert main(["train", "--cfg-path", str(bad)]) == 2
    assert "run.init_lr" in capsys.readouterr().err


def test_train_and_demo_are_registered(capsys):
    import pytest

    for command in ("train", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
    out = capsys.readouterr().out
    assert "--resume" in out and "--cfg-path" in out
