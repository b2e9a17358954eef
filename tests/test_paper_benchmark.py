"""Zero-shot retrieval as the BLIP-2 paper reports it: LAVIS's `flickr30k` and `coco_retrieval` data sets, split
names qualified by data set, and `qformer eval --benchmark paper` on a generated Flickr30K-format set (24 images,
5 captions each) beside a COCO-format one, in this process and on a Ray Train worker."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import tiny_config, tiny_run
from qformer.config import load_config
from qformer.core.errors import AnnotationError, ConfigError

DATA = Path(__file__).parent / "data"


def _write_flickr_layout(root: Path, n_images: int) -> None:
    """LAVIS's Flickr30K layout under a data root: flickr30k/annotations/test.json ({"image":
    "flickr30k-images/<name>.jpg", "caption": [5 captions]} per image) and flickr30k/images/flickr30k-images/."""
    from qformer.data.synth import write_synthetic

    scratch = root / "scratch"
    write_synthetic(scratch, n_train=0, n_val=0, n_test=n_images, seed=7, image_size=48, captions_per_image=5)
    (root / "flickr30k" / "annotations").mkdir(parents=True)
    images = root / "flickr30k" / "images" / "flickr30k-images"
    shutil.copytree(scratch / "images" / "test", images)
    records = json.loads((scratch / "annotations" / "coco_karpathy_test.json").read_text())
    out = [{"image": f"flickr30k-images/{Path(r['image']).name}", "caption": r["caption"]} for r in records]
    (root / "flickr30k" / "annotations" / "test.json").write_text(json.dumps(out))
    shutil.rmtree(scratch)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from qformer.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("paper_data")
    write_synthetic(root / "coco", n_train=4, n_val=2, n_test=12, seed=3, image_size=48, captions_per_image=5)
    _write_flickr_layout(root, 24)
    return root


def _cfg(bert: str, root: Path, tmp_path: Path, datasets: dict | None = None, **run):
    from qformer.data.synth import coco_caption_section

    return tiny_config(bert, datasets or coco_caption_section(root / "coco"),
                       tiny_run(tmp_path, "bench", data_root=str(root), mlflow={"experiment_name": "paper"}, **run))


def test_lavis_retrieval_configs_load_unchanged():
    """LAVIS's ret_flickr_eval.yaml: model_type coco (364 px, the COCO-finetuned weights), flickr30k's LAVIS
    paths, k_test 128; its distributed-run keys are reported as ignored."""
    cfg = load_config(str(DATA / "lavis_ret_flickr_eval.yaml"))
    assert (cfg.model.image_size, cfg.model.vit_precision, cfg.model.freeze_vit) == (364, "fp32", False)
    assert cfg.model.finetuned.endswith("blip2_finetune_coco.pth") and cfg.model.load_finetuned
    anns = cfg.datasets.flickr30k.build_info.annotations
    assert anns.test.storage == "flickr30k/annotations/test.json" and anns.test.url.endswith("flickr30k_test.json")
    assert cfg.datasets.flickr30k.build_info.images.storage == "flickr30k/images"
    assert cfg.run.k_test == 128 and list(cfg.run.test_splits) == ["test"]
    both = load_config(str(DATA / "lavis_ret_flickr_eval.yaml"), ["datasets.coco_retrieval.type=default",
                                                                  "run.test_splits=[coco_retrieval/test,flickr30k/test]"])
    assert both.datasets.coco_retrieval.build_info.annotations.test.storage == "coco/annotations/coco_karpathy_test.json"
    with pytest.raises(ConfigError, match="'test' is a split of several datasets.*flickr30k/test") as err:
        load_config(str(DATA / "lavis_ret_flickr_eval.yaml"), ["datasets.coco_retrieval.type=default"])
    assert err.value.key == "run.test_splits"


def test_flickr30k_is_evaluated_by_name_beside_coco_and_never_trained_on(tiny_bert, data_root, tmp_path):
    from qformer.data.pipeline import build_eval_split, train_sources
    from qformer.data.synth import coco_caption_section

    datasets = {**coco_caption_section(data_root / "coco"), "flickr30k": {}}
    cfg = _cfg(tiny_bert, data_root, tmp_path, datasets, valid_splits=["coco_caption/val", "flickr30k/test"])
    flickr = build_eval_split(cfg, "flickr30k/test")
    assert (flickr.name, len(flickr), len(flickr.texts)) == ("flickr30k", 24, 120)
    assert flickr.image_paths[0].startswith(str(data_root / "flickr30k" / "images" / "flickr30k-images"))
    assert [name for name, _, _ in train_sources(cfg)] == ["coco_caption"]  # zero-shot: no Flickr30K training
    with pytest.raises(ConfigError, match="split 'test' is in several datasets.*<dataset>/test"):
        build_eval_split(cfg, "test")
    with pytest.raises(ConfigError, match="dataset 'flickr30k' has no 'testt' split") as err:
        _cfg(tiny_bert, data_root, tmp_path, datasets, test_splits=["flickr30k/testt"])
    assert err.value.key == "run.test_splits"
    with pytest.raises(ConfigError, match="'flikr30k/test' names no configured dataset"):
        _cfg(tiny_bert, data_root, tmp_path, datasets, valid_splits=["flikr30k/test"])


def _checkpoint(cfg, path: Path) -> Path:
    """The tiny model's seeded weights in LAVIS's {"model": state_dict} layout."""
    from qformer.models import build_model

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": build_model(cfg.model).state_dict()}, path)
    return path


def test_bad_flickr_data_is_named_before_any_evaluation(tiny_bert, data_root, tmp_path):
    from qformer.jobs.paper_benchmark import run_paper_benchmark

    cfg = _cfg(tiny_bert, data_root, tmp_path)
    checkpoint = str(_checkpoint(cfg, tmp_path / "model.pth"))
    missing = load_config(_yaml(cfg, tmp_path), ["datasets.flickr30k.build_info.images.storage=/nowhere/flickr"])
    with pytest.raises(ConfigError, match="image directory /nowhere/flickr") as err:
        run_paper_benchmark(missing, checkpoint, local=True, track=False)
    assert err.value.key == "datasets.flickr30k.build_info.images.storage"
    bad = tmp_path / "bad_test.json"
    bad.write_text(json.dumps([{"image": "flickr30k-images/x.jpg", "caption": 5}]))
    wrong = load_config(_yaml(cfg, tmp_path), [f"datasets.flickr30k.build_info.annotations.test.storage={bad}"])
    with pytest.raises(AnnotationError, match="bad_test.json"):
        run_paper_benchmark(wrong, checkpoint, local=True, track=False)


def _yaml(cfg, tmp_path: Path) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(OmegaConf.to_yaml(cfg))
    return str(path)


@pytest.mark.ray
def test_paper_benchmark_locally_and_on_ray_gives_one_table(ray_cluster, tiny_bert, data_root, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from qformer.cli import main
    from qformer.jobs.paper_benchmark import COLUMNS, TABLE_FILE

    cfg = _cfg(tiny_bert, data_root, tmp_path)
    checkpoint = _checkpoint(cfg, tmp_path / "ckpt" / "model.pth")
    args = ["eval", "--benchmark", "paper", "--cfg-path", _yaml(cfg, tmp_path), "--checkpoint", str(checkpoint)]

    tables = {}
    for where, extra in (("local", ["--local"]),
                         ("ray", ["--options", "run.ray.num_workers=1", "run.ray.resources_per_worker={CPU: 0.5}"])):
        assert main(args + extra) == 0
        out = capsys.readouterr().out
        header = next(line for line in out.splitlines() if "TR@1" in line)
        assert header.split() == list(COLUMNS)
        assert any(line.startswith("COCO 5k test") for line in out.splitlines())
        assert any(line.startswith("Flickr30K 1k test") for line in out.splitlines())
        written = json.loads((checkpoint.parent / f"model.{TABLE_FILE}").read_text())
        tables[where] = written["table"]
        assert written["k_test"] == 128 and set(written["table"]) == {"COCO 5k test", "Flickr30K 1k test"}
        run = MlflowClient(cfg.run.mlflow.tracking_uri).get_run(written["mlflow_run_id"])
        assert run.data.tags["qformer.splits"] == "coco_retrieval/test,flickr30k/test"
        assert run.data.params["run.k_test"] == "128"
        assert run.data.metrics["flickr30k/test/txt_r1"] == pytest.approx(written["table"]["Flickr30K 1k test"]["TR@1"])
        logged = MlflowClient(cfg.run.mlflow.tracking_uri).download_artifacts(
            run.info.run_id, "retrieval/paper_table.json", str(tmp_path / where))
        assert json.loads(Path(logged).read_text())["table"] == written["table"]
    assert tables["ray"] == tables["local"]  # one Ray Train worker or this process: the same recalls
