"""Blip2Qformer (tiny config): shapes of every pass, which params train, frozen ViT mode, losses fall."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import small_model_cfg
from qformer.models import Blip2Output, Blip2Qformer, build_model

TEXTS = ["a red circle on the left", "a blue square", "two green triangles", "a small yellow star"]


def tiny_cfg(bert: str, **over):
    return small_model_cfg(bert, **{"vit_kwargs": {"depth": 2}, "max_txt_len": 12, "embed_dim": 32, **over})


@pytest.fixture(scope="module")
def model(tiny_bert) -> Blip2Qformer:
    torch.manual_seed(0)
    return build_model(tiny_cfg(tiny_bert))


def test_build_model_registers_blip2(model, tiny_bert):
    assert isinstance(model, Blip2Qformer)
    vocab = len(Path(tiny_bert, "vocab.txt").read_text().split())
    assert len(model.tokenizer) == vocab + 1  # [DEC] added after the BERT's vocabulary
    assert model.tokenizer.convert_tokens_to_ids("[DEC]") == model.tokenizer.bos_token_id == vocab
    assert model.Qformer.bert.embeddings.word_embeddings.weight.shape == (vocab + 1, 64)
    assert model.temp.dim() == 0 and abs(model.temp.item() - 0.07) < 1e-7


def test_pass_shapes(model):
    model.eval()
    image = torch.randn(3, 3, 32, 32)
    raw = model.vit_features(image)
    assert raw.shape == (3, 17, 192) and not raw.requires_grad
    feats, embeds_ln = model.encode_image(image=image)
    assert feats.shape == (3, 4, 32) and embeds_ln.shape == (3, 17, 192)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3, 4), atol=1e-5)
    feats2, _ = model.encode_image(image_embeds=raw)
    assert torch.allclose(feats, feats2)
    ids, atts = model.tokenize(TEXTS[:3])
    assert ids.shape == atts.shape == (3, 12) and ids[0, 0].item() == model.tokenizer.cls_token_id
    text_feat = model.encode_text(ids, atts)
    assert text_feat.shape == (3, 32)
    assert model.itm_logits(embeds_ln, ids, atts).shape == (3, 2)
    assert model.itm_logit(embeds_ln, ids, atts).shape == (3,)
    qout = model._query_pass(embeds_ln, use_cache=True)
    bert = model.Qformer.config  # the test BERT: 4 layers of 4 heads, 64 wide
    assert len(qout.past_key_values) == bert.num_hidden_layers == 4
    assert qout.past_key_values[0][0].shape == (3, 4, 4, 16)  # [B, heads, Q, head_dim]


def test_forward_gradients_only_reach_trainable_parts(model):
    model.train()
    assert not model.visual_encoder.training and model.Qformer.training
    model.zero_grad(set_to_none=True)
    out = model({"image": torch.randn(4, 3, 32, 32), "text_input": TEXTS})
    assert isinstance(out, Blip2Output)
    for v in (out.loss, out.loss_itc, out.loss_itm, out.loss_lm):
        assert v.dim() == 0 and torch.isfinite(v)
    assert torch.allclose(out.loss, out.loss_itc + out.loss_itm + out.loss_lm)
    out.loss.backward()
    with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"Qformer", "ln_vision", "vision_proj", "text_proj", "itm_head", "temp", "query_tokens"}
    assert all(not p.requires_grad and p.grad is None for p in model.visual_encoder.parameters())
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []  # DDP(find_unused_parameters=False) needs every trainable parameter used
    cross = model.Qformer.bert.encoder.layer[0].crossattention.self.key.weight
    assert cross.grad is not None and cross.grad.abs().sum() > 0


def test_text_ids_input_equals_text_input(model):
    model.eval()
    ids, atts = model.tokenize(TEXTS)
    embeds = model.vit_features(torch.randn(4, 3, 32, 32))
    torch.manual_seed(1)
    a = model({"image_embeds": embeds, "text_input": TEXTS})
    torch.manual_seed(1)
    b = model({"image_embeds": embeds, "text_ids": ids, "text_atts": atts})
    assert torch.allclose(a.loss, b.loss)


def test_fp16_cached_features_run_on_cpu(model):
    model.eval()
    embeds = model.vit_features(torch.randn(2, 3, 32, 32))
    ids, atts = model.tokenize(TEXTS[:2])
    out = model({"image_embeds": embeds.half(), "text_ids": ids, "text_atts": atts})
    assert torch.isfinite(out.loss)


def test_bad_samples_raise_clear_errors(model):
    with pytest.raises(ValueError, match="text_input"):
        model({"image": torch.randn(2, 3, 32, 32)})
    with pytest.raises(ValueError, match="image"):
        model({"text_input": TEXTS[:2]})
