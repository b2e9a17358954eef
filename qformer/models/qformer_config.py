"""Hyper-parameters of the Q-Former BERT (a BERT config plus the BLIP-2 additions)."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass
class QFormerConfig:
    vocab_size: int = 30523
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    # BLIP-2 additions (LAVIS init_Qformer)
    encoder_width: int = 1408
    cross_attention_freq: int = 2
    query_length: int = 32
    # recompute each layer's activations in the backward pass instead of keeping them (model.qformer_grad_checkpoint).
    # LAVIS's BertEncoder reads the same flag but then drops the query pass's K/V cache, which its LM pass needs;
    # here the cache is kept (non-reentrant checkpointing returns it with its gradient)
    gradient_checkpointing: bool = False

    @classmethod
    def from_bert_json(cls, path: str | Path, **overrides) -> "QFormerConfig":
        """Read a BERT `config.json`; unknown keys are ignored, BLIP-2 keys come from `overrides`."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read BERT config {path}: {err}") from err
        if raw.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not a BERT architecture")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def has_cross_attention(self, layer_index: int) -> bool:
        return layer_index % self.cross_attention_freq == 0
