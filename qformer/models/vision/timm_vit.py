"""Any timm model by name as the frozen image encoder (small configs, the tiny demo model)."""
from __future__ import annotations

import torch
from torch import nn


class TimmEncoder(nn.Module):
    """Wraps `timm.create_model(name, pretrained=False, num_classes=0, **kwargs)`; returns all tokens."""

    def __init__(self, name: str, drop_path_rate: float = 0.0, use_grad_checkpoint: bool = False, **kwargs):
        super().__init__()
        import timm  # lazy: ~1.5 s to import, and only timm: encoders need it (not EVA/CLIP)

        try:
            self.model = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **kwargs)
        except (RuntimeError, TypeError, ValueError) as err:
            raise ValueError(f"model.vit_model='timm:{name}' with model.vit_kwargs={kwargs}: {err}") from err
        self.num_features = self.model.num_features
        if use_grad_checkpoint and hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(True)  # only matters for an unfrozen ViT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_features(x)
        if out.dim() != 3:
            raise ValueError(f"timm model returned features of shape {tuple(out.shape)}; need [B, tokens, dim]")
        return out
