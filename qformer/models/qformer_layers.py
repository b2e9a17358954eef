"""Q-Former building blocks: embeddings, (cross-)attention, the FFNs, one layer with its query/text
split, and the additive attention mask. qformer.models.qformer_bert puts them together into the
Q-Former body and its LM head.

Module/parameter names are LAVIS's `Qformer.py` ones (state-dict keys, spec §3.6); the behaviour is
spec §3.5's: cross-attention only for query positions in layers i % freq == 0, query positions use
`intermediate_query`/`output_query`, text positions `intermediate`/`output`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qformer.models.qformer_config import QFormerConfig

MASK_VALUE = -10000.0  # LAVIS/HF-v4 BERT additive mask value (not finfo.min)

KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]
# Image keys/values of each cross-attention layer ([B, heads, N_img, head_dim] each), in layer order.
CrossKV = tuple[tuple[torch.Tensor, torch.Tensor], ...]


def activation(name: str):
    acts = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}
    if name not in acts:
        raise ValueError(f"unsupported BERT hidden_act {name!r} (known: {sorted(acts)})")
    return acts[name]


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings (no token types); queries go in front without positions."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        # No padding_idx: LAVIS resizes the vocabulary with HF's resize_token_embeddings, which
        # (in the transformers version LAVIS pins) builds a plain nn.Embedding.
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=True
        )
        # Sparse word-embedding gradients: each lookup hands back only its rows instead of a zero-filled
        # vocab x hidden tensor (one per text pass). Only for a model whose backward also has a dense gradient
        # for the same weight to land in (Blip2Qformer's tied LM head), so the optimiser still sees a dense
        # one; nn.Embedding stays dense, so DDP keeps expecting a dense gradient, which it gets.
        self.sparse_word_grads = False

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        query_embeds: torch.Tensor | None = None,
        past_key_values_length: int = 0,
    ) -> torch.Tensor:
        if input_ids is not None:
            seq_length = input_ids.shape[1]
            position_ids = self.position_ids[:, past_key_values_length : past_key_values_length + seq_length]
            sparse = self.sparse_word_grads and torch.is_grad_enabled() and self.word_embeddings.weight.requires_grad
            words = F.embedding(input_ids, self.word_embeddings.weight, sparse=sparse)
            embeddings = words + self.position_embeddings(position_ids)
            if query_embeds is not None:
                embeddings = torch.cat([query_embeds.to(embeddings.dtype), embeddings], dim=1)
        elif query_embeds is not None:
            embeddings = query_embeds
        else:
            raise ValueError("Q-Former needs input_ids, query_embeds or both")
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    def __init__(self, config: QFormerConfig, is_cross_attention: bool):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads {config.num_attention_heads}"
            )
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """`key_value`: this layer's keys/values already projected (cross-attention reuse), used as is."""
        q = self._heads(self.query(hidden_states))
        if key_value is not None:
            k, v = key_value
        else:
            source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            k = self._heads(self.key(source))
            v = self._heads(self.value(source))
        if past_key_value is not None:  # cached query K/V go before the text K/V (LM pass)
            k = torch.cat([past_key_value[0], k], dim=2)
            v = torch.cat([past_key_value[1], v], dim=2)
        mask = attention_mask.to(q.dtype) if attention_mask is not None else None
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0
        )
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, -1), (k, v)


class BertSelfOutput(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.self = BertSelfAttention(config, is_cross_attention)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, past_key_value=None,
                key_value=None):
        context, present = self.self(hidden_states, attention_mask, encoder_hidden_states, past_key_value, key_value)
        return self.output(context, hidden_states), present


class BertIntermediate(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: QFormerConfig, layer_index: int):
        super().__init__()
        self.attention = BertAttention(config)
        self.has_cross_attention = config.has_cross_attention(layer_index)
        if self.has_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        self.intermediate_query = BertIntermediate(config)
        self.output_query = BertOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        query_length: int,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        cross_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        out_rows: int | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """-> (hidden, self-attention K/V, cross-attention image K/V or None). `out_rows`: compute only
        the first rows' outputs (their attention still reads every row's keys/values); the mask must
        not depend on the row (no causal mask)."""
        if out_rows is None:
            attn, present = self.attention(hidden_states, attention_mask, None, past_key_value)
        else:  # the full sequence goes in as the key/value source, only the kept rows as queries
            attn, present = self.attention(hidden_states[:, :out_rows], attention_mask, hidden_states, past_key_value)
        if query_length == 0:
            return self.output(self.intermediate(attn), attn), present, None
        query = attn[:, :query_length]
        image_kv = None
        if self.has_cross_attention:
            if encoder_hidden_states is None and cross_key_value is None:
                raise ValueError("query tokens need encoder_hidden_states (image features) for cross-attention")
            query, image_kv = self.crossattention(query, encoder_attention_mask, encoder_hidden_states,
                                                  key_value=cross_key_value)
        out = self.output_query(self.intermediate_query(query), query)
        if attn.shape[1] > query_length:
            text = attn[:, query_length:]
            out = torch.cat([out, self.output(self.intermediate(text), text)], dim=1)
        return out, present, image_kv


class BertEncoder(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config, i) for i in range(config.num_hidden_layers)])


def extended_attention_mask(
    attention_mask: torch.Tensor, text_length: int, is_decoder: bool, has_query: bool
) -> torch.Tensor:
    """[B, S_k] 0/1 mask -> additive [B,1,S_q|1,S_k] mask with -10000 at blocked positions (spec §3.5).

    Decoder: causal over the `text_length` text tokens, all-ones for the prefix columns (cached or
    in-input queries); with queries in the input their rows see only the queries (UniLM style).
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.float()
    if not is_decoder:
        ext = mask[:, None, None, :]
    else:
        b, total = mask.shape
        ids = torch.arange(text_length, device=mask.device)
        causal = (ids[None, :] <= ids[:, None]).float().expand(b, -1, -1)
        prefix = total - text_length
        if prefix > 0:
            if has_query:
                causal = torch.cat([causal.new_zeros(b, prefix, text_length), causal], dim=1)
            causal = torch.cat([causal.new_ones(b, causal.shape[1], prefix), causal], dim=2)
        ext = causal[:, None] * mask[:, None, None, :]
    return (1.0 - ext) * MASK_VALUE
