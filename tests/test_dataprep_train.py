"""From an empty data root to training, offline: `data download` (COCO + VG stand-ins from a loopback server at
LAVIS's paths), `data prepare` (a web URL list with bad rows and bad answers, on the session's Ray, resumed
after a lost shard), `weights fetch` (the tiny ViT's weights as "eva_vit_g.pth", BERT from a stand-in hub),
then one short training run on all of it: the three sources mixed by ratio, the model built from the fetched
weights."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

from http_stub import StubServer, add_hub_repo
from lavis_standin import coco_standin, standin_catalog, vg_standin
from web_standin import serve_web_list
from helpers import tiny_config, tiny_run

pytestmark = pytest.mark.ray

EVA_PATH = "/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
TINY_VIT = {"img_size": 64, "patch_size": 8, "depth": 4}  # the tiny model_type's ViT


def _tiny_vit_file() -> tuple[bytes, dict]:
    import timm

    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT).state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue(), state


def test_from_an_empty_root_to_a_trained_step(ray_cluster, tiny_bert, tmp_path: Path, monkeypatch) -> None:
    from qformer.jobs.data_download import download
    from qformer.jobs.prepare_job import prepare
    from qformer.jobs.train_job import launch_training
    from qformer.jobs.weights_fetch import fetch_weights

    vit_bytes, vit_state = _tiny_vit_file()
    root = tmp_path / "data"
    with StubServer() as server:
        bodies = {**coco_standin(tmp_path / "coco_src"), **vg_standin(tmp_path)}
        for path, body in bodies.items():
            server.add(path, body, drop_after=500 if path.endswith("images.zip") else None)
        standin_catalog(monkeypatch, bodies)
        report = download(["coco", "vg"], root=str(root), mirrors={"*": server.base}, backoff_s=0)
        assert not report.failed, report.summary()

        web = serve_web_list(server, tmp_path / "web", good=60, seed=3)
        first = prepare(str(web.path), str(root / "web"), "wds", shard_size=16, threads=16, timeout=5)
        assert first.shards == 5 and first.stats["successes"] == web.good
        (root / "web" / "00002_stats.json").unlink()  # as if the run had stopped inside shard 2
        asked = len(server.requests)
        again = prepare(str(web.path), str(root / "web"), "wds", shard_size=16, threads=16, timeout=5)
        assert again.skipped_shards == 4 and again.stats == first.stats
        assert 0 < len(server.requests) - asked <= 16  # only shard 2's rows were fetched again

        server.add(EVA_PATH, vit_bytes, goog_md5=True)
        add_hub_repo(server, "bert-base-uncased", {p.name: p.read_bytes() for p in Path(tiny_bert).iterdir()
                                                    if p.is_file()})
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.base)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        monkeypatch.setattr("huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE",
                            server.base + "/{repo_id}/resolve/{revision}/{filename}")
        options, errors = fetch_weights(["eva_vit_g", "bert-base-uncased"], to=str(tmp_path / "weights"),
                                        mirrors={"*": server.base})
        assert not errors, errors
    assert "storage: " + str(root / "web") + "/{00000..00004}.tar" in again.entry()

    web_entry = {"builder": "image_text_shards", "build_info": {"storage": str(root / "web/{00000..00004}.tar")},
                 "vis_processor": {"train": {"name": "blip2_image_train", "image_size": 64}}}
    proc = {"vis_processor": {"train": {"name": "blip2_image_train", "image_size": 64}}}
    run = tiny_run(tmp_path, "from-zero", data={"batch_size": 8, "task_rows": 8}, data_root=str(root),
                   runner="runner_iter", max_iters=3, iters_per_inner_epoch=3,
                   train_dataset_ratios={"web": 2, "coco_caption": 1, "vg_caption": 1})
    cfg = tiny_config(tiny_bert, {"web": web_entry, "coco_caption": proc, "vg_caption": proc}, run,
                      options=[o for o in options.values()] + ["model.image_size=64"])
    assert cfg.model.vit_weights == str(tmp_path / "weights" / "eva_vit_g.pth")
    assert cfg.model.bert_model == str(tmp_path / "weights" / "bert-base-uncased")
    result = launch_training(cfg, local_mode=True)
    assert result.error is None and result.metrics["step"] == 3

    from qformer.models import build_model

    model = build_model(cfg.model)  # what each worker built: the fetched ViT weights, loaded
    loaded = model.visual_encoder.state_dict()
    key = next(k for k in loaded if k.endswith("patch_embed.proj.weight"))
    assert torch.equal(loaded[key].float(), vit_state["patch_embed.proj.weight"].float())
    assert os.path.isfile(root / "coco/annotations/coco_karpathy_train.json")
