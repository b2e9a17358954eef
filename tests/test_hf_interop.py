"""Equality with transformers' BLIP-2 (tiny random config, weights copied by our converter)."""
from __future__ import annotations

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from qformer.models import build_model
from qformer.models.hf_convert import (
    export_hf,
    from_hf_retrieval,
    hf_qformer_config,
    hf_retrieval_config,
    qformer_to_hf,
    to_hf_retrieval,
)


@pytest.fixture(scope="module")
def model(tiny_bert):
    torch.manual_seed(0)
    cfg = OmegaConf.create(
        {
            "arch": "blip2", "model_type": "tiny", "load_pretrained": False,
            "vit_model": "eva_clip_g",
            # one eps for every ViT LayerNorm incl. ln_vision, because HF has a single vision eps
            "vit_kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0, "patch_size": 8, "eps": 1e-5},
            "image_size": 32, "vit_precision": "fp32", "num_query_token": 4, "bert_model": tiny_bert,
            "max_txt_len": 10, "embed_dim": 24,
        }
    )
    m = build_model(cfg).eval()
    with torch.no_grad():  # make the fresh parts non-trivial so a wrong mapping cannot hide
        for p in [m.ln_vision.weight, m.ln_vision.bias] + [p for n, p in m.visual_encoder.named_parameters() if "bias" in n]:
            p.add_(0.1 * torch.randn_like(p))
    return m


def _hf_retrieval(model):
    hf = transformers.Blip2ForImageTextRetrieval(hf_retrieval_config(model))
    converted, dropped = to_hf_retrieval(model.state_dict())
    result = hf.load_state_dict(converted, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(k.startswith(("Qformer.cls.", "temp", "Qformer.bert.embeddings.position_ids")) for k in dropped)
    return hf.eval()


def test_query_outputs_and_itm_logits_match_transformers(model):
    hf = _hf_retrieval(model)
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32)
    ids, atts = model.tokenize(["a red circle", "two blue squares on grass", "x"])
    with torch.no_grad():
        ours_q = model._query_pass(model.ln_vision(model.vit_features(pixels))).last_hidden_state
        hf_img = hf.vision_model(pixel_values=pixels).last_hidden_state
        hf_q = hf.qformer(query_embeds=hf.query_tokens.expand(3, -1, -1), encoder_hidden_states=hf_img).last_hidden_state
        assert torch.allclose(ours_q, hf_q, atol=1e-5), (ours_q - hf_q).abs().max()

        ours_itm = model.itm_logits(model.ln_vision(model.vit_features(pixels)), ids, atts)
        hf_itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=atts, use_image_text_matching_head=True).logits_per_image
        assert torch.allclose(ours_itm, hf_itm, atol=1e-5), (ours_itm - hf_itm).abs().max()

        # ITC side: HF's cosine matrix == max over queries of our normalised features
        feats, _ = model.encode_image(image=pixels)
        text = model.encode_text(ids, atts)
        ours_sim = torch.einsum("iqe,te->itq", feats, text).amax(-1)
        hf_sim = hf(pixel_values=pixels, input_ids=ids, attention_mask=atts).logits_per_image
        assert torch.allclose(ours_sim, hf_sim, atol=1e-5)


def test_qformer_body_matches_blip2qformermodel(model):
    hf = transformers.Blip2QFormerModel(hf_qformer_config(model)).eval()
    result = hf.load_state_dict(qformer_to_hf(model.state_dict()), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    embeds = torch.randn(2, 17, 48)
    q = model.query_tokens.expand(2, -1, -1)
    with torch.no_grad():
        ours = model.Qformer.bert(query_embeds=q, encoder_hidden_states=embeds).last_hidden_state
        theirs = hf(query_embeds=q, encoder_hidden_states=embeds).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_hf_round_trip_restores_every_converted_tensor(model):
    ours = model.state_dict()
    converted, dropped = to_hf_retrieval(ours)
    back = from_hf_retrieval(converted)
    assert set(back) == set(ours) - set(dropped)
    for key, value in back.items():
        assert torch.equal(value, ours[key]), key


def test_export_hf_directory_loads_with_from_pretrained(model, tmp_path):
    out = export_hf(model, tmp_path / "hf")
    hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(str(out)).eval()
    ref = _hf_retrieval(model)
    pixels = torch.randn(2, 3, 32, 32)
    ids, atts = model.tokenize(["a cat", "a dog"])
    with torch.no_grad():
        a = hf(pixel_values=pixels, input_ids=ids, attention_mask=atts, use_image_text_matching_head=True).logits_per_image
        b = ref(pixel_values=pixels, input_ids=ids, attention_mask=atts, use_image_text_matching_head=True).logits_per_image
    assert torch.allclose(a, b, atol=1e-6)
    tok = transformers.BertTokenizer.from_pretrained(str(out))
    assert tok.bos_token == "[DEC]" and len(tok) == len(model.tokenizer)


def test_export_hf_command(tmp_path, tiny_bert):
    from qformer.cli import main

    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "model:\n  arch: blip2\n  model_type: tiny\n  vit_model: eva_clip_g\n"
        "  vit_kwargs: {embed_dim: 16, depth: 1, num_heads: 2, mlp_ratio: 2.0, patch_size: 8}\n"
        f"  image_size: 32\n  num_query_token: 2\n  bert_model: {tiny_bert}\n"
    )
    from qformer.config import load_config

    torch.manual_seed(3)
    model = build_model(load_config(str(exp)).model)
    torch.save({"model": model.trainable_state_dict(), "epoch": 0}, tmp_path / "ckpt.pth")
    assert main(["export-hf", "--cfg-path", str(exp), "--checkpoint", str(tmp_path / "ckpt.pth"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path / "hf"))
    assert torch.equal(hf.itm_head.weight, model.itm_head.weight)
    assert torch.equal(hf.qformer.encoder.layer[0].crossattention.attention.key.weight,
                       model.Qformer.bert.encoder.layer[0].crossattention.self.key.weight)
    # a timm encoder has no HF counterpart: the Q-Former body alone is written
    opts = ["model.num_query_token=2", "model.vit_kwargs.depth=1", f"model.bert_model={tiny_bert}"]
    timm_model = build_model(load_config("experiments/demo/tiny_shapes.yaml", opts).model)
    torch.save({"model": timm_model.trainable_state_dict()}, tmp_path / "timm.pth")
    assert main(["export-hf", "--cfg-path", "experiments/demo/tiny_shapes.yaml", "--checkpoint", str(tmp_path / "timm.pth"),
                 "--out", str(tmp_path / "hf_q"), "--options", *opts]) == 0
    body = transformers.Blip2QFormerModel.from_pretrained(str(tmp_path / "hf_q"))
    assert torch.equal(body.layernorm.weight, timm_model.Qformer.bert.embeddings.LayerNorm.weight)
