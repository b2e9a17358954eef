"""The smallest real Blip2Qformer the model tests share: a 1-block timm ViT at 32 px (17 tokens) and the
shipped MiniLM BERT, in eval mode so that dropout does not differ between two runs being compared."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from qformer.models import build_model


def small_model(bert_path: str, max_txt_len: int = 16, num_query_token: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    cfg = OmegaConf.create({
        "arch": "blip2", "model_type": "tiny", "load_pretrained": False, "vit_model": "timm:vit_tiny_patch16_224",
        "vit_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}, "image_size": 32, "vit_precision": "fp32",
        "num_query_token": num_query_token, "bert_model": bert_path, "max_txt_len": max_txt_len, "embed_dim": 16})
    return build_model(cfg).eval()
