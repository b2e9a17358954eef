"""The frozen ViT as the cache job's actors run it, and a fingerprint of its weights.

The encoder is the model's own `vit_features` (built with `qformer.models.build_model`), so cached
features are what the online path computes. Randomly initialised ViTs (`model.vit_weights: null`,
the tiny demo) depend on the RNG at build time; the build seeds like rank 0 of training does, and
the weight fingerprint stored in the manifest lets training check that its ViT is the same one.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from qformer.core.seeding import setup_seeds
from qformer.data.normalize import image_mean_std, normalize_uint8
from qformer.models import build_model


def vit_fingerprint(module: Any, sample: int = 4096) -> str:
    """Hash of every parameter/buffer's name, shape and first `sample` values, rounded to fp16.

    Rounding to fp16 makes a CUDA fp16-converted ViT and its fp32 original agree; sampling keeps
    hashing a 1B-parameter ViT-g fast.
    """
    h = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        if tensor.is_floating_point():
            vals = tensor.detach().reshape(-1)[:sample].to("cpu", torch.float16).float().numpy()
            h.update(vals.tobytes())
    return h.hexdigest()[:16]


class ModelEncoder:
    """Callable uint8 [B,3,S,S] (NumPy) -> fp32 NumPy [B,N,D]: normalise, then `model.vit_features`."""

    def __init__(self, cfg_container: dict, device: str | None = None):
        cfg = OmegaConf.create(cfg_container)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        setup_seeds(int(cfg.run.seed), 0)  # as training's rank 0 before build_model
        self.model = build_model(cfg.model).to(self.device).eval()
        self.mean, self.std = image_mean_std(cfg)
        self.fingerprint = vit_fingerprint(self.model.visual_encoder)
        # The online path runs the ViT inside the training step's autocast; do the same on CUDA.
        self.autocast = self.device.startswith("cuda") and bool(cfg.run.amp)
        self.amp_dtype = torch.bfloat16 if str(cfg.run.get("amp_dtype", "auto")) == "bf16" else torch.float16

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, non_blocking=True)
        x = normalize_uint8(x, self.mean, self.std)
        with torch.inference_mode(), torch.autocast("cuda", self.amp_dtype, enabled=self.autocast):
            feats = self.model.vit_features(x)
        return feats.float().cpu().numpy()


class EncoderFactory:
    """Picklable zero-argument factory handed to Ray (the config travels as a plain dict)."""

    def __init__(self, cfg: Any):
        self.cfg_container = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg

    def __call__(self) -> ModelEncoder:
        return ModelEncoder(self.cfg_container)
