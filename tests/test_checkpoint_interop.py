"""LAVIS checkpoint compatibility: key names, trainable_state_dict, round trip, config-driven loading."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from helpers import small_model_cfg
from qformer.models import Blip2Qformer, build_model

BERT_BASE = {
    "model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512, "layer_norm_eps": 1e-12, "initializer_range": 0.02, "pad_token_id": 0,
}


@pytest.fixture(scope="module")
def bert_base_dir(tmp_path_factory, minilm_path):
    """bert-base-uncased's config + vocabulary (same vocab as MiniLM) with an empty weight file."""
    d = tmp_path_factory.mktemp("bert_base")
    (d / "config.json").write_text(json.dumps(BERT_BASE))
    for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{minilm_path}/{f}", d / f)
    save_file({}, str(d / "model.safetensors"))
    return str(d)


def full_size(bert_dir: str, vit_model: str) -> Blip2Qformer:
    with torch.device("meta"):
        return Blip2Qformer(vit_model=vit_model, bert_model=bert_dir, vit_precision="fp32")


def test_full_size_layout_is_blip2_pretrained_pth(bert_base_dir):
    """Keys and shapes of spec §3.6; the saved (trainable) dict has no ViT keys; ≈187M trainable."""
    model = full_size(bert_base_dir, "eva_clip_g")
    sd = model.trainable_state_dict()
    expected = {
        "query_tokens": (1, 32, 768), "temp": (), "ln_vision.weight": (1408,), "vision_proj.weight": (256, 768),
        "text_proj.weight": (256, 768), "itm_head.weight": (2, 768), "itm_head.bias": (2,),
        "Qformer.bert.embeddings.word_embeddings.weight": (30523, 768),
        "Qformer.bert.embeddings.position_embeddings.weight": (512, 768),
        "Qformer.bert.embeddings.position_ids": (1, 512),
        "Qformer.bert.encoder.layer.0.attention.self.query.weight": (768, 768),
        "Qformer.bert.encoder.layer.0.crossattention.self.key.weight": (768, 1408),
        "Qformer.bert.encoder.layer.10.crossattention.self.value.weight": (768, 1408),
        "Qformer.bert.encoder.layer.11.intermediate_query.dense.weight": (3072, 768),
        "Qformer.bert.encoder.layer.11.output_query.dense.weight": (768, 3072),
        "Qformer.bert.encoder.layer.11.output_query.LayerNorm.weight": (768,),
        "Qformer.cls.predictions.bias": (30523,), "Qformer.cls.predictions.decoder.weight": (30523, 768),
        "Qformer.cls.predictions.decoder.bias": (30523,), "Qformer.cls.predictions.transform.dense.weight": (768, 768),
        "Qformer.cls.predictions.transform.LayerNorm.weight": (768,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("visual_encoder.") for k in sd)
    assert not any(".crossattention." in k for k in sd if ".layer.1." in k or ".layer.11." in k)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 186.5e6 < trainable < 188.5e6, trainable  # spec §3.4: ≈187M ("188M" in the paper)
    # a blip2_pretrained.pth-style file has exactly these keys: nothing unexpected, only the ViT missing
    full = set(model.state_dict())
    assert set(sd) <= full and {k for k in full - set(sd)} == {k for k in full if k.startswith("visual_encoder.")}


def test_full_size_vitL_crossattention_reads_1024(bert_base_dir):
    model = full_size(bert_base_dir, "clip_L")
    sd = model.state_dict()
    assert sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"].shape == (768, 1024)
    assert sd["ln_vision.weight"].shape == (1024,)
    assert "visual_encoder.transformer.resblocks.22.ln_2.weight" in sd


def _tiny(bert, **over):
    return small_model_cfg(bert, max_txt_len=8, **over)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_bert):
    torch.manual_seed(0)
    model = build_model(_tiny(tiny_bert))
    with torch.no_grad():
        model.temp.fill_(0.05)
        model.itm_head.bias.fill_(0.3)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_0.pth"
    torch.save({"model": model.trainable_state_dict(), "optimizer": {}, "config": {}, "scaler": None, "epoch": 0}, path)
    return model, path


def test_lavis_checkpoint_round_trip_reports_only_vit_missing(saved, tiny_bert):
    model, path = saved
    torch.manual_seed(5)
    fresh = build_model(_tiny(tiny_bert))
    report = fresh.load_lavis_checkpoint(str(path))
    assert report["unexpected"] == []
    assert report["missing"] and all(k.startswith("visual_encoder.") for k in report["missing"])
    ours, theirs = model.trainable_state_dict(), fresh.trainable_state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert fresh.Qformer.cls.predictions.decoder.weight is fresh.Qformer.bert.embeddings.word_embeddings.weight


def test_config_load_pretrained_and_finetuned(saved, tiny_bert):
    _, path = saved
    m = build_model(_tiny(tiny_bert, load_pretrained=True, pretrained=str(path)))
    assert abs(m.temp.item() - 0.05) < 1e-7
    m = build_model(_tiny(tiny_bert, load_finetuned=True, finetuned=str(path), load_pretrained=True, pretrained="x"))
    assert torch.allclose(m.itm_head.bias, torch.full((2,), 0.3))
    with pytest.raises(ValueError, match="model.finetuned"):
        build_model(_tiny(tiny_bert, load_finetuned=True, finetuned=""))


def test_bad_checkpoints_raise_clear_errors(saved, tmp_path):
    model, _ = saved
    with pytest.raises(ValueError, match="not found"):
        model.load_checkpoint(str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="shape mismatch"):
        model.load_checkpoint({"model": {"query_tokens": torch.zeros(1, 7, 384)}})
    with pytest.raises(ValueError, match="state dict"):
        model.load_checkpoint({"model": "oops"})


def test_optimizer_groups_follow_lavis_head_rules(saved):
    model, _ = saved
    groups = {g["name"]: g for g in model.get_optimizer_params(weight_decay=0.05)}
    assert set(groups) == {"decay", "no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert {"temp", "query_tokens", "Qformer.bert.embeddings.word_embeddings.weight"} <= decay
    assert {"ln_vision.weight", "Qformer.cls.predictions.bias", "itm_head.bias"} <= no_decay
    assert not any(n.startswith("visual_encoder.") for n in decay | no_decay)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decay) + len(no_decay) == n_trainable


def test_unfrozen_vit_gets_per_layer_lr_scale(tiny_bert):
    model = build_model(_tiny(tiny_bert, freeze_vit=False, vit_model="eva_clip_g",
                              vit_kwargs={"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_size": 8}))
    groups = {g["name"]: g for g in model.get_optimizer_params(weight_decay=0.05, lr_scale=0.5)}
    assert groups["vit_layer_0_decay"]["lr_scale"] == 0.5 ** 3  # patch embedding / pos_embed
    assert groups["vit_layer_2_no_decay"]["lr_scale"] == 0.5 ** 1  # last block
    assert groups["decay"]["lr_scale"] == 1.0
    model.train()
    assert model.visual_encoder.training  # unfrozen ViT follows train()


def test_training_checkpoint_carries_a_random_vit_but_not_one_from_a_weight_file(tiny_bert, tmp_path):
    """A ViT with no weight file (the tiny config's random encoder) cannot be rebuilt from disk, so the
    training checkpoint stores it; one loaded from `model.vit_weights` is left out, as LAVIS does."""
    torch.manual_seed(0)
    random_vit = build_model(_tiny(tiny_bert))
    state = random_vit.checkpoint_state_dict()
    vit_keys = {k for k in state if k.startswith("visual_encoder.")}
    assert vit_keys == {f"visual_encoder.{k}" for k in random_vit.visual_encoder.state_dict()}
    assert set(state) - vit_keys == set(random_vit.trainable_state_dict())

    torch.manual_seed(1)  # another random init: loading the checkpoint restores the original encoder
    other = build_model(_tiny(tiny_bert))
    assert other.load_checkpoint({"model": state})["missing"] == []
    image = torch.randn(2, 3, 32, 32)
    assert torch.equal(other.vit_features(image), random_vit.vit_features(image))

    weights = tmp_path / "vit.pth"
    torch.save(random_vit.visual_encoder.state_dict(), weights)
    from_file = build_model(_tiny(tiny_bert, vit_weights=str(weights)))
    assert not any(k.startswith("visual_encoder.") for k in from_file.checkpoint_state_dict())
