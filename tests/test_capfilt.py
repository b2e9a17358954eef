"""CapFilt's parts without Ray: the seeded sampler, ranking and keeping, the stages on tiny random models, the
output shards and their statistics, and the offline model check."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qformer.core.errors import ConfigError
from qformer.data.capfilt.ranking import Kept, ShardStats, candidates, keep_top, quantiles
from qformer.data.capfilt.sampling import SeededTopP, row_seeds, sample_seed
from qformer.data.capfilt.shards import OutSample, output_name, read_stats, write_output
from qformer.data.shard_check import verify_shard
from qformer.data.shard_records import ShardReading, read_samples
from qformer.data.shard_set import DEFAULT_KEYS, ShardSet


def test_seeded_top_p_draws_per_row_from_the_nucleus_only() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4000))
    seeds = row_seeds(np.arange(4000), 1)
    drawn = SeededTopP(seeds, top_p=0.9)(torch.zeros(4000, 3, dtype=torch.long), logits).argmax(-1).numpy()
    freq = np.bincount(drawn, minlength=4) / 4000
    assert freq[3] == 0  # outside the 0.9 nucleus (0.5 + 0.3 + 0.15 reach it)
    assert np.allclose(freq[:3], np.array([0.5, 0.3, 0.15]) / 0.95, atol=0.03)
    again = SeededTopP(seeds[:10], top_p=0.9)(torch.zeros(10, 3, dtype=torch.long), logits[:10]).argmax(-1).numpy()
    assert (again == drawn[:10]).all()  # a row's draw does not depend on the other rows
    later = SeededTopP(seeds, top_p=0.9)(torch.zeros(4000, 4, dtype=torch.long), logits).argmax(-1).numpy()
    assert (later != drawn).any()  # the next step draws anew
    assert (SeededTopP(seeds, 1e-6)(torch.zeros(4000, 3, dtype=torch.long), logits).argmax(-1) == 0).all()
    assert sample_seed(0, "a.tar", 1) == sample_seed(0, "a.tar", 1) != sample_seed(0, "a.tar", 2)


def test_candidates_drop_empty_and_repeated_texts_and_keep_originals_first() -> None:
    texts, n = candidates(["  a dog ", ""], ["a cat", "a dog", " ", "a cat", "a bird"])
    assert (texts, n) == (["a dog", "a cat", "a bird"], 1)
    assert candidates([], ["x"]) == (["x"], 0)


def test_keep_top_ranks_by_score_stably_and_says_whether_the_original_survived() -> None:
    kept = keep_top(["web", "s1", "s2", "s3"], np.array([0.2, 0.5, 0.2, 0.1]), 1, 2)
    assert kept.captions == ["s1", "web"] and kept.original_kept and kept.original_score == 0.2  # tie: web first
    lost = keep_top(["web", "s1", "s2"], np.array([0.0, 0.5, 0.3]), 1, 2)
    assert lost.captions == ["s1", "s2"] and not lost.original_kept
    none = keep_top(["s1", "s2"], np.array([0.1, 0.3]), 0, 2)
    assert none.captions == ["s2", "s1"] and none.original_score is None
    assert Kept.from_json(kept.to_json()) == kept


def test_shard_statistics_add_up_and_summarise() -> None:
    a, b = ShardStats(), ShardStats()
    a.count(Kept(["x", "y"], [0.3, 0.1], True, 0.1), True)
    a.count(None, True)
    b.count(Kept(["z", "w"], [0.25, 0.2], False, -0.2), True)
    b.count(Kept(["v", "u"], [0.4, 0.2], False, None), False)
    b.lost["damaged"] = 3
    total = ShardStats.from_dict(json.loads(json.dumps(a.to_dict())))
    total.add(b)
    s = total.summary()
    assert (s["samples"], s["captioned"], s["undecodable"], s["no_original_caption"]) == (4, 3, 1, 1)
    assert s["original_kept"] == 1 and s["original_kept_rate"] == pytest.approx(1 / 2)
    assert s["lost_at_read"] == {"damaged": 3}
    assert s["kept_score"]["n"] == 6 and s["top_score"]["p50"] == pytest.approx(0.3, abs=0.01)
    assert quantiles(np.zeros(200, np.int64)) == {"n": 0}


def _shard_set(path: str, fmt: str) -> ShardSet:
    return ShardSet("out", fmt, (path,), *DEFAULT_KEYS[fmt])


@pytest.mark.parametrize("fmt", ["wds", "parquet", "csv"])
def test_written_shards_read_back_with_their_captions(tmp_path: Path, fmt: str) -> None:
    image = (tmp_path / "i.png")
    image.write_bytes(b"\x89PNG fake")
    by_bytes = fmt != "csv"
    samples = [OutSample(f"in.tar#k{i}" if by_bytes else str(image), b"\x89PNG fake" if by_bytes else b"",
                         ["web"] if i else [], Kept(["s1", "web"], [0.4, 0.3], True, 0.3) if i < 2 else None)
               for i in range(3)]
    stats = ShardStats()
    for s in samples:
        stats.count(s.kept, bool(s.originals))
    name = output_name(f"/in/00007.{ {'wds': 'tar', 'parquet': 'parquet', 'csv': 'csv'}[fmt]}", fmt)
    write_output(str(tmp_path / "out"), name, fmt, samples, stats)
    out = tmp_path / "out" / name
    assert name.endswith({"wds": ".tar", "parquet": ".parquet", "csv": ".jsonl"}[fmt])
    assert sorted(os.listdir(tmp_path / "out")) == sorted([name, name.rsplit(".", 1)[0] + "_stats.json"])  # no temp file
    read_fmt = "jsonl" if fmt == "csv" else fmt
    reading = ShardReading(str(out))
    got = list(read_samples(_shard_set(str(out), read_fmt), str(out), reading))
    # sample 0: no original caption, kept synthetic ones; 1: both kept; 2: undecodable, its original only
    assert [g[2] for g in got] == [("s1", "web"), ("s1", "web"), "web"]
    assert (got[0][1] == b"\x89PNG fake") if by_bytes else got[0][0] == str(image)
    assert read_stats(str(tmp_path / "out"), name).to_dict() == stats.to_dict()
    if fmt == "wds":
        assert verify_shard(_shard_set(str(out), "wds"), str(out)).expected == 3  # img2dataset's successes


def test_an_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    from qformer.data.storage import write_bytes

    write_bytes(str(tmp_path / "d" / "x.tar"), b"one")
    write_bytes(str(tmp_path / "d" / "x.tar"), b"two")
    assert (tmp_path / "d" / "x.tar").read_bytes() == b"two" and os.listdir(tmp_path / "d") == ["x.tar"]


def test_a_model_that_cannot_load_offline_is_one_line_naming_it(tmp_path: Path, monkeypatch) -> None:
    from qformer.data.capfilt.stages import load_processor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(ConfigError) as err:
        load_processor("Salesforce/blip-image-captioning-large", "captioner")
    text = str(err.value)
    assert text.startswith("--captioner: cannot load 'Salesforce/blip-image-captioning-large'") and "\n" not in text
    assert "hf download Salesforce/blip-image-captioning-large" in text


def test_stages_caption_reproducibly_in_any_batch_and_pass_undecodable_images(capfilt_models) -> None:
    from qformer.data.capfilt.stages import Captioner, Scorer, decode_batch, load_processor
    from qformer.data.synth import render, sample_scene
    import io

    captioner, scorer = capfilt_models
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    render(sample_scene(rng), 48, rng).save(buf, format="JPEG")
    batch = {"name": np.asarray(["s#0", "s#1", "s#2"], object),
             "data": np.asarray([buf.getvalue(), b"junk", buf.getvalue()], object),
             "index": np.arange(3), "seed": np.asarray([11, 12, 13]),
             "originals": np.asarray([json.dumps(["a red circle"]), json.dumps(["x"]), json.dumps([])], object)}
    decoded = decode_batch(batch, load_processor(captioner, "captioner").image_processor,
                           load_processor(scorer, "scorer").image_processor)
    assert decoded["ok"].tolist() == [True, False, True] and decoded["cap_pixels"].shape == (3, 3, 32, 32)
    cap = Captioner(captioner, num_captions=4)
    out = cap(decoded)
    texts = [json.loads(g) for g in out["generated"]]
    assert [len(t) for t in texts] == [4, 0, 4] and "cap_pixels" not in out and all(texts[0])
    alone = cap.captions(decoded["cap_pixels"][2:], np.asarray([13]))
    assert alone[0] == texts[2]  # a sample's captions do not depend on its batch
    assert cap.captions(decoded["cap_pixels"][2:], np.asarray([14]))[0] != texts[2]
    kept = Scorer(scorer, keep=2)(out)["kept"]
    assert kept[1] == "" and [len(Kept.from_json(k).captions) for k in (kept[0], kept[2])] == [2, 2]
    assert Kept.from_json(kept[2]).original_score is None  # no original caption: scored out, not an empty string


def test_the_command_stops_on_a_model_it_cannot_load_before_ray_starts(tmp_path: Path, capsys, monkeypatch,
                                                                        capfilt_models) -> None:
    import qformer.jobs.capfilt
    from qformer.cli import main
    from qformer.data.synth_shards import write_shards

    def no_ray(*_):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(qformer.jobs.capfilt, "connect_ray_at", no_ray)
    info = write_shards(tmp_path, "wds", shards=1, per_shard=2, seed=0, image_size=16)
    code = main(["data", "capfilt", "--in", info["storage"], "--out", str(tmp_path / "out"),
                 "--captioner", capfilt_models[0], "--scorer", str(tmp_path / "no-such-clip")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"qformer data: --scorer: cannot load '{tmp_path / 'no-such-clip'}'")
    assert not (tmp_path / "out").exists()


def test_output_in_object_storage_is_written_found_and_read_back(s3_endpoint: str) -> None:
    """--out s3://...: the stats object, then the shard; a rerun's check finds it (and not a missing one), and
    training's reader reads the kept captions from the bucket."""
    from qformer.data.capfilt.shards import written

    samples = [OutSample(f"in.tar#k{i}", b"\x89PNG fake", ["web"], Kept([f"s{i}", "web"], [0.4, 0.3], True, 0.3))
               for i in range(2)]
    stats = ShardStats()
    for s in samples:
        stats.count(s.kept, True)
    out = "s3://shards/capfilt-out"
    write_output(out, "00001.tar", "wds", samples, stats, s3_endpoint)
    assert written(out, ["00001.tar", "00002.tar"], s3_endpoint) == {"00001.tar"}
    assert read_stats(out, "00001.tar", s3_endpoint).to_dict() == stats.to_dict()
    shard_set = ShardSet("out", "wds", (f"{out}/00001.tar",), *DEFAULT_KEYS["wds"], endpoint=s3_endpoint)
    got = list(read_samples(shard_set, f"{out}/00001.tar", ShardReading(f"{out}/00001.tar")))
    assert [g[2] for g in got] == [("s0", "web"), ("s1", "web")]
