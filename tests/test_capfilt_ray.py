"""`qformer data capfilt` end to end on the session's Ray with tiny random models: every sample gets `keep`
captions ranked as scoring outside Ray ranks them, bad samples pass through, a rerun writes only the missing
shards, and training on the output draws among the kept captions, the same after a resume."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from qformer.data.capfilt.ranking import candidates
from qformer.data.capfilt.sampling import sample_seed
from qformer.data.shard_records import ShardReading, read_samples
from qformer.data.shard_set import ShardSet
from qformer.data.synth import render, sample_scene
from qformer.data.synth_shards import write_shard, write_shards
from helpers import audit_rows, shards_config
from step_hooks import FailOnceAtStep

pytestmark = pytest.mark.ray


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    render(sample_scene(rng), 48, rng).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def capfilt(ray_cluster, capfilt_models, tmp_path_factory):
    """Two 4-sample wds shards and a third with an undecodable image and an empty web caption, through CapFilt."""
    from qformer.data.capfilt.pipeline import CapfiltSpec
    from qformer.jobs.capfilt import Tracking, capfilt_job

    root = tmp_path_factory.mktemp("capfilt")
    info = write_shards(root / "in", "wds", shards=2, per_shard=4, seed=5, image_size=48)
    write_shard(Path(info["folder"]) / "00002.tar", "wds", [("0000200000", b"not an image", "a lost picture"),
                                                            ("0000200001", _jpeg(1), "")])
    spec = CapfiltSpec(*capfilt_models, batch_size=4, actor_cpus=0.5, task_cpus=0.5)
    pattern, out = f"{info['folder']}/{{00000..00002}}.tar", str(root / "out")
    tracking = Tracking(f"sqlite:///{root}/mlflow.db", "test-capfilt")
    summary = capfilt_job(pattern, out, spec, tracking=tracking)
    return {"root": root, "pattern": pattern, "out": Path(out), "spec": spec, "summary": summary, "tracking": tracking}


def _samples(path: Path) -> list:
    return list(read_samples(ShardSet("o", "wds", (str(path),), "txt", None), str(path), ShardReading(str(path))))


def _meta(path: Path) -> dict[str, dict]:
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name[:-5]: json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")}


def test_every_sample_keeps_the_top_captions_as_clip_ranks_them_outside_ray(capfilt, capfilt_models) -> None:
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    from qformer.data.capfilt.stages import Captioner

    out, spec, summary = capfilt["out"], capfilt["spec"], capfilt["summary"]
    assert (summary["shards_written"], summary["samples"], summary["captioned"]) == (3, 10, 9)
    assert (summary["undecodable"], summary["no_original_caption"]) == (1, 1)
    assert json.loads((out / "capfilt_summary.json").read_text())["original_kept"] == summary["original_kept"]
    bad = {s[0].rpartition("#")[2]: s[2] for s in _samples(out / "00002.tar")}
    assert bad["0000200000"] == "a lost picture"  # undecodable: passed through with its web caption only
    assert isinstance(bad["0000200001"], tuple) and len(bad["0000200001"]) == 2  # no web caption: synthetic only
    captioner = Captioner(capfilt_models[0], spec.num_captions, spec.top_p, spec.prompt)
    clip = AutoModel.from_pretrained(capfilt_models[1]).eval()
    processor = AutoProcessor.from_pretrained(capfilt_models[1])
    cap_images = AutoProcessor.from_pretrained(capfilt_models[0]).image_processor
    meta = _meta(out / "00000.tar")
    source = _samples(Path(capfilt["pattern"].rsplit("/", 1)[0]) / "00000.tar")
    for index, (name, data, web) in enumerate(source):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        generated = captioner.captions(cap_images(images=image, return_tensors="np")["pixel_values"],
                                       np.asarray([sample_seed(spec.seed, "00000.tar", index)]))[0]
        texts, n_web = candidates([web], generated)
        with torch.no_grad():
            inputs = processor(text=texts, images=image, return_tensors="pt", padding=True, truncation=True,
                               max_length=77)  # CLIP's text length, which the scorer cuts captions to
            out_ = clip(**inputs)
        sims = torch.nn.functional.cosine_similarity(out_.image_embeds, out_.text_embeds).numpy()
        best = np.argsort(-sims, kind="stable")[:2]
        kept = meta[name.rpartition("#")[2]]
        assert kept["captions"] == [texts[i] for i in best] and n_web == 1
        assert np.allclose(kept["scores"], sims[best], atol=1e-4)
        assert kept["original_kept"] == bool((best < n_web).any())


def test_the_summary_is_an_mlflow_run_when_tracking_is_on(capfilt) -> None:
    from mlflow.tracking import MlflowClient

    run = MlflowClient(capfilt["tracking"].uri).get_run(capfilt["summary"]["mlflow_run_id"])
    assert run.data.metrics["samples"] == 10 and run.data.params["keep"] == "2"
    assert run.data.metrics["original_kept"] == capfilt["summary"]["original_kept"]


def test_a_rerun_writes_only_the_shards_not_written(capfilt) -> None:
    from qformer.jobs.capfilt import capfilt_job

    out = capfilt["out"]
    kept = {n: os.stat(out / n) for n in ("00000.tar", "00002.tar")}
    before = (out / "00001.tar").read_bytes()
    (out / "00001.tar").unlink()  # as if the job had been stopped before writing it
    summary = capfilt_job(capfilt["pattern"], str(out), capfilt["spec"])
    assert (summary["shards_written"], summary["shards_skipped"], summary["images_this_run"]) == (1, 2, 4)
    for name, st in kept.items():  # not rewritten: same file, same modification time
        now = os.stat(out / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert (out / "00001.tar").read_bytes() == before  # seeded: the same captions again
    assert summary["samples"] == 10 and summary["original_kept"] == capfilt["summary"]["original_kept"]


def test_training_draws_among_the_kept_captions_and_the_same_after_a_resume(capfilt, tiny_bert, tmp_path) -> None:
    from qformer.data.pipeline import train_sources, train_transform
    from qformer.data.tokenizer import tokenize
    from qformer.jobs.train_job import launch_training

    out = capfilt["out"]
    cfg = shards_config(tiny_bert, tmp_path, f"{out}/{{00000..00001}}.tar", "capfilt",
                        {"max_epoch": 6, "save_freq_steps": 3})
    spec = train_transform(cfg, train_sources(cfg))
    caption_of = {}  # audit id (hash of the caption's token ids) -> (sample, caption)
    for shard in ("00000.tar", "00001.tar"):
        for key, meta in _meta(out / shard).items():
            for text in meta["captions"]:
                ids = tokenize(spec.bert_model, [spec.text_processors[0](text)], spec.max_txt_len)[0][0]
                caption_of[hash(tuple(ids.tolist()))] = (key, text)
    assert len(caption_of) == 16  # 8 samples x 2 captions, told apart by their tokens
    debug = tmp_path / "debug"
    cfg.run.data.audit_dir = str(debug)
    with pytest.raises(Exception, match="injected failure"):
        launch_training(cfg, local_mode=True, step_hooks=[FailOnceAtStep(4, str(tmp_path / "failed_once"))])
    crashed = audit_rows(debug)
    (debug / "rows-rank0.jsonl").unlink()
    result = launch_training(cfg, local_mode=True)
    resumed = audit_rows(debug)
    assert result.error is None and resumed[0][0] == 4 and result.metrics["step"] == 12  # 2 steps a pass
    trained = [i for _, ids in crashed for i in ids] + [i for _, ids in resumed for i in ids]
    assert set(trained) <= set(caption_of)  # only kept captions are trained on
    seen: dict[str, set] = {}
    for i in [i for s, ids in crashed if s <= 3 for i in ids] + [i for _, ids in resumed for i in ids]:
        key, text = caption_of[i]
        seen.setdefault(key, set()).add(text)
    assert len(seen) == 8 and all(len(texts) == 2 for texts in seen.values())  # over 6 passes, both of each
    step = {s: set(ids) for s, ids in crashed}
    again = {s: set(ids) for s, ids in resumed}
    assert step[4] == again[4]  # the rest of pass 1 after the step-3 checkpoint: the same captions drawn again
