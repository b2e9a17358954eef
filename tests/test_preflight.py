"""Checks the driver makes before Ray starts: image folders and a sample of images (qformer.data.preflight),
and `qformer train` failing on them in seconds, without starting Ray.

The commands run in this process through `qformer.cli.main` (with `ray.init` replaced by a recorder, so a
start is seen even where the session's Ray is up); the console script itself, in a subprocess, is checked
by the Ray-start test at the end."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import data_config
from qformer.config import ConfigError
from qformer.data.preflight import check_images
from qformer.data.synth import coco_caption_section

QFORMER = Path(sys.executable).parent / "qformer"


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """Runs `qformer ARGS` in-process as the console script would (fresh QFORMER_HOME, no RAY_ADDRESS);
    returns (exit code, stdout, stderr, Ray starts attempted)."""
    import ray

    from qformer.cli import main

    starts: list = []

    def init(*args, **kwargs):
        starts.append(kwargs)
        raise RuntimeError("this test's command must not start Ray")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the session's Ray, if up, is not this command's
    monkeypatch.setenv("RAY_ADDRESS", "")
    monkeypatch.setenv("QFORMER_HOME", str(tmp_path / "home"))
    qformer_log = logging.getLogger("qformer")  # the command's setup_logging binds a new handler to this stderr
    monkeypatch.setattr(qformer_log, "handlers", [])
    monkeypatch.setattr(qformer_log, "propagate", qformer_log.propagate)

    def run(args: list[str]) -> tuple[int, str, str, list]:
        capsys.readouterr()
        code = main(args)
        out, err = capsys.readouterr()
        return code, out, err, list(starts)

    return run


def _cfg(datasets: dict, **run):
    return data_config(datasets, **{"test_splits": ["test"], **run})


def test_missing_image_folder_names_the_folder_and_key(synth_data: Path, tmp_path: Path) -> None:
    ds = coco_caption_section(synth_data)
    ds["coco_caption"]["build_info"]["images"]["storage"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as info:
        check_images(_cfg(ds), ["train", "test"])
    assert info.value.key == "datasets.coco_caption.build_info.images.storage"
    assert f"image directory {tmp_path / 'nowhere'} does not exist (split 'train' reads 48 images" in str(info.value)
    check_images(_cfg(ds, data={"check_images": False}), ["train"])  # the driver cannot see the mount: off


def test_a_split_none_of_whose_sampled_images_opens_stops(synth_data: Path, tmp_path: Path, caplog) -> None:
    images = tmp_path / "images"
    shutil.copytree(synth_data / "images", images)
    for path in (images / "test").glob("*.jpg"):
        path.write_bytes(b"not a jpeg")
    ds = coco_caption_section(synth_data)
    ds["coco_caption"]["build_info"]["images"]["storage"] = str(images)
    check_images(_cfg(ds), ["train"])  # train images are fine; test is not asked for
    with pytest.raises(ConfigError, match=r"none of 8 sampled images of split 'test' opens \(image folder "
                                          rf"{images}\), e.g. {images}/test/\S+\.jpg: "):
        check_images(_cfg(ds), ["train", "test"])
    # a few bad files only warn: training skips and counts them
    for path in sorted((images / "test").glob("*.jpg"))[:12]:
        shutil.copy(synth_data / "images" / "test" / path.name, path)
    with caplog.at_level(logging.WARNING, logger="qformer.data"):
        check_images(_cfg(ds), ["test"])
    assert "coco_caption/test:" in caplog.text and "of 8 sampled images do not open" in caplog.text


def test_train_with_a_missing_image_folder_fails_before_ray(synth_data: Path, tmp_path: Path, cli) -> None:
    ds = coco_caption_section(synth_data)
    ds["coco_caption"]["build_info"]["images"]["storage"] = str(tmp_path / "nowhere")
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"model": {"arch": "blip2", "model_type": "tiny"}, "datasets": ds,
                                   "run": {"output_dir": str(tmp_path / "out")}}))
    code, out, err, ray_starts = cli(["train", "--cfg-path", str(exp)])
    assert code == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith("qformer train: datasets.coco_caption.build_info.images.storage: image directory "
                                f"{tmp_path / 'nowhere'} does not exist"), err[-3000:]
    assert "Traceback" not in err
    assert ray_starts == [] and "Ray" not in out + err  # no Ray was started (nor MLflow run opened)
    assert not (tmp_path / "home" / "mlflow").exists()


def test_surrogate_caption_stops_train_naming_file_and_record(synth_data: Path, tmp_path: Path, cli) -> None:
    train = json.loads((synth_data / "annotations" / "coco_karpathy_train.json").read_text())[:4]
    train[2]["caption"] = "a \ud800 shape"
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(train))  # ensure_ascii: the lone surrogate is written as \ud800
    ds = coco_caption_section(synth_data)
    ds["coco_caption"]["build_info"]["annotations"]["train"]["storage"] = str(ann)
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"model": {"arch": "blip2", "model_type": "tiny"}, "datasets": ds}))
    for command in (["train"], ["data", "check"]):
        code, out, err, ray_starts = cli([*command, "--cfg-path", str(exp)])
        output = out + err
        assert code != 0 and "Traceback" not in output and ray_starts == [], output[-3000:]
        assert f"{ann}, record 2: 'caption' holds text that is not valid Unicode" in output


def _exp(tmp_path: Path, synth_data: Path) -> Path:
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"model": {"arch": "blip2", "model_type": "tiny"},
                                   "datasets": coco_caption_section(synth_data),
                                   "run": {"output_dir": str(tmp_path / "out"), "test_splits": ["test"]}}))
    return exp


@pytest.mark.parametrize("command", [["eval", "--checkpoint"], ["export-hf", "--out", "OUT", "--checkpoint"],
                                     ["train", "--resume"]])
def test_a_file_that_is_not_a_checkpoint_is_one_line_before_ray(synth_data: Path, tmp_path: Path, cli, command) -> None:
    bogus = tmp_path / "notes.pth"
    bogus.write_text("these are my notes, not tensors")
    args = [str(tmp_path / a) if a == "OUT" else a for a in command]
    for path, reason in ((bogus, "cannot be read as a torch checkpoint"), (tmp_path / "gone.pth", "does not exist")):
        code, out, err, ray_starts = cli([args[0], "--cfg-path", str(_exp(tmp_path, synth_data)), *args[1:], str(path)])
        assert code == 2, err[-3000:]
        assert "Traceback" not in err and ray_starts == [] and "Ray" not in out + err, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert str(path) in last and reason in last, last


def test_ray_that_cannot_start_is_one_line_saying_what_to_try(synth_data: Path, tmp_path: Path) -> None:
    """The console script in its own process (a Ray start is real here: no session Ray to stand in for)."""
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": "/proc/qformer-no-such-dir",
           "QFORMER_HOME": str(tmp_path / "home")}
    proc = subprocess.run([str(QFORMER), "train", "--cfg-path", str(_exp(tmp_path, synth_data))],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("qformer train: could not start a local Ray (") and "run.ray.address" in last, last
    assert "/proc/qformer-no-such-dir/ray/session_latest/logs" in last


def test_a_local_ray_start_that_times_out_is_tried_once_more(monkeypatch) -> None:
    """Ray gives a new raylet 30 s to register; on a busy machine the first start can miss that. The start is
    retried once, after shutting down what the first try left; any other start error is raised as it is."""
    import ray

    from qformer.jobs import ray_cluster

    calls: list[tuple[str, dict]] = []
    failures = ["The current node timed out during startup. This could happen because ..."]

    def init(**kwargs):
        calls.append(("init", kwargs))
        if failures:
            raise Exception(failures.pop())

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown", {})))
    ray_cluster.start_local_ray(num_cpus=1)
    assert calls == [("init", {"address": "local", "num_cpus": 1}), ("shutdown", {}),
                     ("init", {"address": "local", "num_cpus": 1})]

    calls.clear()
    failures.extend(["The current node timed out during startup.", "The current node timed out during startup."])
    with pytest.raises(Exception, match="timed out during startup"):  # once more only
        ray_cluster.start_local_ray()
    assert [name for name, _ in calls] == ["init", "shutdown", "init"]

    calls.clear()
    failures.append("some other failure")
    with pytest.raises(Exception, match="some other failure"):
        ray_cluster.start_local_ray()
    assert [name for name, _ in calls] == ["init"]
