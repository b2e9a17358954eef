"""Analytic FLOP counts (multiply-add = 2 FLOPs) for the frozen ViT and the Q-Former train step.

Why analytic: the cache's payoff at ViT-g scale (EVA ViT-g/14, 39 blocks, width 1408) cannot be
measured on a CPU, but its ratio follows from matmul FLOPs, which dominate both models. The counts
are checked against torch's FlopCounterMode on real modules (tests/test_bench_cache.py).
Per image; layer norms, softmax and GELU (a few % at these sizes) are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

from qformer.models.flops import QFormerDims


@dataclass(frozen=True)
class VitDims:
    image_size: int = 224
    patch: int = 14
    width: int = 1408
    depth: int = 39
    mlp: int = 6144
    cls_token: bool = True

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2 + int(self.cls_token)


EVA_VIT_G = VitDims()                                                    # spec §3.3
VIT_B_16 = VitDims(image_size=224, patch=16, width=768, depth=12, mlp=3072)
BERT_BASE_QFORMER = QFormerDims()  # spec §3.4 (its image_tokens/image_width: EVA_VIT_G's, unread here)


def _self_attn(n: int, m: int, d: int) -> int:
    """n new tokens attending over m keys: Q/K/V/out projections + scores + weighted sum."""
    return 8 * n * d * d + 4 * n * m * d


def _ffn(n: int, d: int, h: int) -> int:
    return 4 * n * d * h


def _last_layer(n: int, kept: int, d: int, h: int) -> int:
    """A last layer computing only `kept` of its n rows (K/V still projected for all n)."""
    return 4 * n * d * d + 4 * kept * d * d + 4 * kept * n * d + _ffn(kept, d, h)


def _cross_attn(nq: int, n_img: int, d: int, d_img: int) -> int:
    """nq queries over n_img image tokens of width d_img (K/V project image tokens d_img -> d)."""
    return 4 * nq * d * d + 4 * n_img * d_img * d + 4 * nq * n_img * d


def vit_forward_flops(v: VitDims) -> int:
    n = v.tokens
    patches = (v.image_size // v.patch) ** 2
    embed = 2 * patches * 3 * v.patch * v.patch * v.width
    return embed + v.depth * (_self_attn(n, n, v.width) + _ffn(n, v.width, v.mlp))


@dataclass(frozen=True)
class StepVariant:
    """What a stage-1 step computes beyond the minimum: `itm_kv_rows` of the ITM pass's 3 image rows
    per image project their image K/V (the rest index the query pass's: Blip2Qformer.reuse_itm_kv);
    `all_last_rows`: the text and ITM passes compute every row of their last layer (LAVIS), not only
    the rows that are read ([CLS]; the query rows); `trims_padding`: text passes run at the batch's
    used width, not max_txt_len (callers pick QFormerDims.text_len accordingly)."""

    itm_kv_rows: int
    all_last_rows: bool
    trims_padding: bool = True


LAVIS_STEP = StepVariant(itm_kv_rows=3, all_last_rows=True, trims_padding=False)
OURS_ONE_RANK = StepVariant(itm_kv_rows=0, all_last_rows=False)    # every ITM image is in the local batch
OURS_MULTI_RANK = StepVariant(itm_kv_rows=1, all_last_rows=False)  # negatives gathered from other ranks projected
STEP_VARIANTS = {"lavis": LAVIS_STEP, "ours_multi_rank": OURS_MULTI_RANK, "ours_one_rank": OURS_ONE_RANK}


def qformer_forward_flops(q: QFormerDims, n_img: int, d_img: int, batch: int = 100,
                          step: StepVariant = LAVIS_STEP) -> dict[str, int]:
    """Forward FLOPs per image of each stage-1 pass (spec §4: query, text, ITM on 3 pairs, LM)."""
    d, h, L, Q, T = q.hidden, q.intermediate, q.layers, q.queries, q.text_len
    n_cross = len(range(0, L, q.cross_attention_freq))
    cross = _cross_attn(Q, n_img, d, d_img)
    cross_no_kv = cross - 4 * n_img * d_img * d

    def layers(n: int, kept: int) -> int:  # n rows through L layers, the last one computing `kept` rows
        full = _self_attn(n, n, d) + _ffn(n, d, h)
        return L * full if step.all_last_rows else (L - 1) * full + _last_layer(n, kept, d, h)

    query = L * (_self_attn(Q, Q, d) + _ffn(Q, d, h)) + n_cross * cross + 2 * Q * d * q.embed_dim
    text = layers(T, 1) + 2 * d * q.embed_dim
    itm_one = layers(Q + T, Q) + 2 * Q * d * 2
    itm = 3 * (itm_one + n_cross * cross_no_kv) + step.itm_kv_rows * n_cross * (cross - cross_no_kv)
    lm = L * (_self_attn(T, Q + T, d) + _ffn(T, d, h)) + 2 * T * d * d + 2 * T * d * q.vocab
    itc = 2 * 2 * batch * Q * q.embed_dim  # both similarity directions against the batch
    return {"query": query, "text": text, "itm": itm, "lm": lm, "itc": itc}


def qformer_train_flops(q: QFormerDims, n_img: int, d_img: int, batch: int = 100, step: StepVariant = LAVIS_STEP) -> int:
    """Forward + backward (backward = 2x forward: input and weight gradients) per image."""
    return 3 * sum(qformer_forward_flops(q, n_img, d_img, batch, step).values())


def cache_speedup(v: VitDims, q: QFormerDims, batch: int = 100, step: StepVariant = LAVIS_STEP) -> dict[str, float]:
    """Projected epoch-time ratio online/cached when both are compute-bound at equal FLOP/s."""
    vit = vit_forward_flops(v)
    train = qformer_train_flops(q, v.tokens, v.width, batch, step)
    return {"vit_forward_gflops": vit / 1e9, "qformer_train_gflops": train / 1e9,
            "projected_speedup": (vit + train) / train}
