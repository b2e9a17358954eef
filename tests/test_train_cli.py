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


def test_bad_annotations_fail_before_ray_starts(tmp_path: Path, monkeypatch, capsys):
    """The annotation files are read and checked before `qformer train` connects to Ray."""
    import qformer.jobs.train_job as launcher

    def no_ray(cfg):
        raise AssertionError("Ray was started before the annotations were checked")

    monkeypatch.setattr(launcher, "connect_ray", no_ray)
    (tmp_path / "train.json").write_text('[{"image": "a.jpg", "caption": "fine"}, {"image": "b.jpg"}]')
    exp = tmp_path / "exp.yaml"
    exp.write_text("model: {arch: blip2, model_type: tiny}\n"
                   "datasets: {coco_caption: {build_info: {annotations: {train: {storage: %s}}, "
                   "images: {storage: %s}}}}\n" % (tmp_path / "train.json", tmp_path))
    assert main(["train", "--cfg-path", str(exp)]) == 2
    err = capsys.readouterr().err
    assert "train.json" in err and "Ray was started" not in err
