"""Analytic matmul FLOPs of one BLIP-2 stage-1 training sample (2 FLOPs per multiply-add).

Counted: every Linear/attention matmul of the four Q-Former passes (query pass with
cross-attention, text pass, ITM pass over 3 pairs whose image K/V come from the query pass
(Blip2Qformer.reuse_itm_kv; `itm_kv_rows` of the 3 rows per image project their own), LM pass over cached query K/V plus the
vocabulary head on the predicted positions) and of the frozen ViT forward. Training costs
3x the Q-Former forward (forward + backward for activations and weights); the frozen ViT runs
forward only. Norms, softmax and elementwise ops are left out (they are not matmuls).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from qformer.models.vision.layer_ids import vit_num_layers


@dataclass(frozen=True)
class QFormerDims:
    """The sizes the FLOP counts read: the Q-Former's own, the image tokens its cross-attention reads
    (`image_tokens` of width `image_width`) and the caption width `text_len`. Defaults: the BERT-base
    Q-Former of BLIP-2 over EVA ViT-g/14 at 224 px (257 tokens, width 1408), max_txt_len 32.
    Shared with qformer.features.flops, whose functions take the image sizes from a VitDims instead."""

    hidden: int = 768
    intermediate: int = 3072
    layers: int = 12
    cross_attention_freq: int = 2
    vocab: int = 30523
    queries: int = 32
    image_tokens: int = 257
    image_width: int = 1408
    embed_dim: int = 256
    text_len: int = 32


def _layer(d: QFormerDims, tq: int, tt: int, prefix: int = 0, cross: bool = False, image_kv: bool = True,
           out_rows: int | None = None) -> int:
    """One Q-Former layer: tq query + tt text tokens attending over (tq+tt+prefix) keys; with `out_rows`
    only the first rows are computed (their attention still projects every row's K/V)."""
    h, t = d.hidden, tq + tt
    o = t if out_rows is None else min(out_rows, t)
    f = 2 * 2 * t * h * h  # K, V projections
    f += 2 * 2 * o * h * h  # Q, output projections
    f += 2 * 2 * o * (t + prefix) * h  # scores + weighted values
    f += 2 * 2 * o * h * d.intermediate  # FFN (query or text weights, same size)
    if cross and tq:
        n, oq = d.image_tokens, min(tq, o)
        f += 2 * 2 * oq * h * h  # cross query + output projections
        f += 2 * 2 * n * d.image_width * h if image_kv else 0  # cross K, V projections of the image tokens
        f += 2 * 2 * oq * n * h  # cross scores + weighted values
    return f


def _pass(d: QFormerDims, tq: int, tt: int, prefix: int = 0, image_kv: bool = True, out_rows: int | None = None) -> int:
    """All layers; `out_rows` applies to the last one (Blip2Qformer keeps only the rows it reads)."""
    return sum(_layer(d, tq, tt, prefix, cross=i % d.cross_attention_freq == 0, image_kv=image_kv,
                      out_rows=out_rows if i == d.layers - 1 else None) for i in range(d.layers))


def qformer_forward_flops(d: QFormerDims, text_len: int, lm_targets: float, itm_kv_rows: int = 0) -> dict[str, float]:
    """Per-sample forward FLOPs of each pass; `lm_targets` = predicted (non-pad) positions;
    `itm_kv_rows`: ITM rows per sample projecting image K/V (0 on one rank, 1 on several, 3 in LAVIS)."""
    q, h = d.queries, d.hidden
    itm_row = _pass(d, q, text_len, image_kv=False, out_rows=q) + 2 * q * h * 2
    image_kv = _pass(d, q, 0) - _pass(d, q, 0, image_kv=False)
    out = {
        "query_pass": _pass(d, q, 0) + 2 * q * h * d.embed_dim,
        "text_pass": _pass(d, 0, text_len, out_rows=1) + 2 * h * d.embed_dim,
        "itm_pass": 3 * itm_row + itm_kv_rows * image_kv,
        "lm_pass": _pass(d, 0, text_len, prefix=q) + lm_targets * (2 * h * h + 2 * h * d.vocab),
    }
    out["itc_sims"] = 0.0  # B*B*Q*E per sample-pair: negligible and batch-dependent, left out
    return out


def vit_forward_flops(encoder: nn.Module, image_size: int) -> float:
    """Per-image forward FLOPs of a ViT built from blocks of (attention, MLP)."""
    linears = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
    mha = [m for m in encoder.modules() if isinstance(m, nn.MultiheadAttention)]
    conv = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d))
    patch = conv.kernel_size[0]
    n = (image_size // patch) ** 2 + 1
    width = conv.out_channels
    flops = 2 * (n - 1) * conv.in_channels * patch * patch * width
    for lin in linears:
        if lin.in_features == lin.out_features == width and any(lin is m.out_proj for m in mha):
            continue  # counted with the MultiheadAttention below
        flops += 2 * n * lin.in_features * lin.out_features
    for m in mha:
        flops += 2 * n * width * 3 * width + 2 * n * width * width
    blocks = _num_blocks(encoder)
    flops += blocks * 2 * 2 * n * n * width  # attention scores + weighted values
    return float(flops)


def _num_blocks(encoder: nn.Module) -> int:
    blocks = vit_num_layers(encoder)
    if not blocks:
        raise ValueError(f"cannot find the transformer blocks of {type(encoder).__name__}")
    return blocks


def model_dims(model, image_size: int, text_len: int = QFormerDims.text_len) -> QFormerDims:
    c = model.Qformer.config
    vit = model.visual_encoder
    conv = next(m for m in vit.modules() if isinstance(m, nn.Conv2d))
    return QFormerDims(
        hidden=c.hidden_size, intermediate=c.intermediate_size, layers=c.num_hidden_layers,
        cross_attention_freq=c.cross_attention_freq, vocab=c.vocab_size, queries=model.query_tokens.shape[1],
        image_tokens=(image_size // conv.kernel_size[0]) ** 2 + 1, image_width=vit.num_features,
        embed_dim=model.vision_proj.out_features, text_len=text_len,
    )


def train_flops_per_sample(model, image_size: int, text_len: int, lm_targets: float, world_size: int = 1) -> dict:
    """{"qformer_forward": {...}, "vit_forward", "total"} with total = 3 x Q-Former fwd + ViT fwd."""
    dims = model_dims(model, image_size, text_len)
    kv_rows = 3 if not getattr(model, "reuse_itm_kv", False) else (0 if world_size == 1 else 1)
    qf = qformer_forward_flops(dims, text_len, lm_targets, kv_rows)
    vit = vit_forward_flops(model.visual_encoder, image_size)
    q_total = sum(qf.values())
    return {"qformer_forward": qf, "qformer_forward_total": q_total, "vit_forward": vit,
            "total": 3 * q_total + vit, "dims": asdict(dims)}
