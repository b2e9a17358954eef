"""The Q-Former: BERT with learned queries, image cross-attention and separate query FFNs.

Module/parameter names reproduce LAVIS's `Qformer.py` so that `Qformer.bert.encoder.layer.{i}...`
state-dict keys of `blip2_pretrained.pth` load unchanged (spec §3.6). Behaviour follows spec §3.5:
queries (no position embedding) are prepended to the text, LayerNorm+dropout over the whole
sequence, cross-attention only for query positions in layers i % freq == 0, query positions use
`intermediate_query`/`output_query`, text positions `intermediate`/`output`. The layers and the
attention mask are in qformer.models.qformer_layers; the body, the MLM head and BertLMHeadModel
(LAVIS's `Qformer`) here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qformer.models.losses import LMLoss
from qformer.models.qformer_config import QFormerConfig
from qformer.models.qformer_layers import (
    BertEmbeddings, BertEncoder, CrossKV, KVCache, activation, extended_attention_mask,
)


@dataclass
class QFormerOutput:
    last_hidden_state: torch.Tensor
    past_key_values: KVCache | None = None
    cross_key_values: CrossKV | None = None  # with return_cross_kv: the image K/V each cross layer used


class BertModel(nn.Module):
    """The Q-Former body (`Qformer.bert`)."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        is_decoder: bool = False,
        cross_key_values: CrossKV | None = None,
        return_cross_kv: bool = False,
        out_rows: int | None = None,
    ) -> QFormerOutput:
        """`cross_key_values` replaces the image K/V projections of the cross-attention layers (one
        (K, V) per cross layer, e.g. another pass's `return_cross_kv` output re-indexed by row): the
        projections of the same image rows give the same K/V, so a pass may take them instead of
        `encoder_hidden_states` and skip the largest matmuls of the image path.

        `out_rows`: only the first rows of `last_hidden_state` are used (the ITM pass reads the query
        rows, the text pass [CLS]), so the last layer computes just those; the others are dropped.
        Not with is_decoder (row-dependent mask) or use_cache (the last layer's K/V would be partial)."""
        if out_rows is not None and (is_decoder or use_cache):
            raise ValueError("out_rows needs an encoder pass without use_cache")
        query_length = query_embeds.shape[1] if query_embeds is not None else 0
        past_length = past_key_values[0][0].shape[2] - self.config.query_length if past_key_values else 0
        hidden = self.embeddings(input_ids, query_embeds, past_length)
        b, seq = hidden.shape[:2]
        cached = past_key_values[0][0].shape[2] if past_key_values else 0
        if attention_mask is None and not is_decoder:
            mask = None  # nothing to mask (query pass): lets SDPA pick its fastest kernel
        elif is_decoder:
            if attention_mask is None:
                attention_mask = torch.ones(b, seq + cached, dtype=torch.long, device=hidden.device)
            if input_ids is None:
                raise ValueError("decoder mode needs input_ids")
            mask = extended_attention_mask(attention_mask, input_ids.shape[1], True, query_embeds is not None)
        else:
            mask = extended_attention_mask(attention_mask, seq, False, False)
        enc_mask = None
        if encoder_attention_mask is not None and not bool(encoder_attention_mask.all()):
            enc_mask = extended_attention_mask(encoder_attention_mask, 0, False, False)
        presents, image_kvs = [], []
        given_kv = iter(cross_key_values) if cross_key_values is not None else None
        last = len(self.encoder.layer) - 1
        # non-reentrant: the K/V a layer returns (the LM pass's cache, the ITM pass's image K/V) keep their
        # gradients, and dropout replays the same masks (the RNG state is restored for the recomputation)
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.encoder.layer):
            past = past_key_values[i] if past_key_values else None
            kv = next(given_kv) if given_kv is not None and layer.has_cross_attention and query_length else None
            rows = out_rows if i == last else None
            args = (hidden, mask, query_length, encoder_hidden_states, enc_mask, past, kv, rows)
            hidden, present, image_kv = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
            presents.append(present)
            if image_kv is not None:
                image_kvs.append(image_kv)
        return QFormerOutput(hidden, tuple(presents) if use_cache else None,
                             tuple(image_kvs) if return_cross_kv else None)


    def image_key_values(self, encoder_hidden_states: torch.Tensor) -> CrossKV:
        """Each cross-attention layer's image K/V for these embeddings, as a pass would project them."""
        return tuple(
            (attn._heads(attn.key(encoder_hidden_states)), attn._heads(attn.value(encoder_hidden_states)))
            for attn in (layer.crossattention.self for layer in self.encoder.layer if layer.has_cross_attention)
        )


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias  # both keys appear in the state dict, as in LAVIS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


@dataclass
class LMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None


class BertLMHeadModel(nn.Module):
    """`Qformer` in LAVIS: body + tied MLM head; the LM pass uses it in decoder mode."""

    def __init__(self, config: QFormerConfig, label_smoothing: float = 0.1):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertOnlyMLMHead(config)
        self.tie_weights()
        self.lm_loss = LMLoss(label_smoothing=label_smoothing)
        self.init_weights()

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def init_weights(self) -> None:
        """HF BERT init: Linear/Embedding N(0, initializer_range), biases 0, LayerNorm 1/0."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.cls.predictions.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        labels: torch.Tensor | None = None,
        query_embeds: torch.Tensor | None = None,
        return_logits: bool = True,
        lm_index: torch.Tensor | None = None,
    ) -> LMOutput:
        """return_logits=False with labels: loss only, the vocabulary head skips pad positions
        (`lm_index`: the predicted positions, see LMLoss.from_hidden)."""
        if past_key_values is not None:
            query_embeds = None  # queries come from the cache
        out = self.bert(
            input_ids,
            attention_mask=attention_mask,
            query_embeds=query_embeds,
            past_key_values=past_key_values,
            is_decoder=True,
        )
        hidden = out.last_hidden_state
        if query_embeds is not None:
            hidden = hidden[:, query_embeds.shape[1] :]
        if labels is not None and not return_logits:
            return LMOutput(self.lm_loss.from_hidden(hidden, labels, self.cls, lm_index), None)
        logits = self.cls(hidden)
        loss = self.lm_loss(logits, labels) if labels is not None else None
        return LMOutput(loss, logits)
