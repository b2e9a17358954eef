"""A few AdamW steps on one small batch lower each of ITC, ITM and LM (tiny model, CPU).

The BERT is the shipped MiniLM cut to its first 2 layers, written as a real checkpoint directory
(config.json, vocab.txt, model.safetensors), so steps stay cheap on a shared 2-core box.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file


from qformer.models import build_model

TEXTS = ["a red circle on the left", "a blue square at the top", "two green triangles", "a small yellow star"]


@pytest.fixture(scope="module")
def small_bert(tmp_path_factory, minilm_path) -> str:
    d = tmp_path_factory.mktemp("small_bert")
    config = json.loads(open(f"{minilm_path}/config.json").read())
    (d / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{minilm_path}/{f}", d / f)
    state = load_file(f"{minilm_path}/model.safetensors")
    keep = {k: v for k, v in state.items() if not k.startswith("encoder.layer.") or int(k.split(".")[2]) < 2}
    save_file(keep, str(d / "model.safetensors"))
    return str(d)


def _losses(model, samples) -> dict[str, float]:
    """Deterministic measures: eval mode (no dropout); ITM on fixed pairs in the loss's 1:2 layout,
    (i, i) matched, (i, i+1) and (i, i+2) not."""
    model.eval()
    with torch.no_grad():
        out = model(samples)
        embeds_ln = model.ln_vision(samples["image_embeds"])
        order = [torch.arange(4), torch.roll(torch.arange(4), 1), torch.roll(torch.arange(4), 2)]
        logits = model.itm_logits(torch.cat([embeds_ln] * 3),
                                  torch.cat([samples["text_ids"][o] for o in order]),
                                  torch.cat([samples["text_atts"][o] for o in order]))
        itm = F.cross_entropy(logits, torch.tensor([1] * 4 + [0] * 8))
    return {"loss_itc": float(out.loss_itc), "loss_itm": float(itm), "loss_lm": float(out.loss_lm)}


def test_adamw_steps_lower_every_loss(small_bert):
    torch.manual_seed(0)
    cfg = OmegaConf.create({
        "arch": "blip2", "load_pretrained": False, "vit_model": "timm:vit_tiny_patch16_224",
        "vit_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}, "image_size": 32, "vit_precision": "fp32",
        "num_query_token": 4, "bert_model": small_bert, "max_txt_len": 12, "embed_dim": 32,
    })
    model = build_model(cfg)
    ids, atts = model.tokenize(TEXTS)
    samples = {"image_embeds": model.vit_features(torch.randn(4, 3, 32, 32)), "text_ids": ids, "text_atts": atts}
    before = _losses(model, samples)
    opt = torch.optim.AdamW(model.get_optimizer_params(weight_decay=0.05), lr=3e-4)
    for _ in range(8):
        model.train()
        model(samples).loss.backward()
        opt.step()
        opt.zero_grad()
    after = _losses(model, samples)
    for k in before:
        assert after[k] < before[k], (k, before, after)
