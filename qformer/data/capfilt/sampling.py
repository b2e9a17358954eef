"""Nucleus sampling seeded per sample, inside transformers' `generate`.

`generate(do_sample=True)` draws every row of a batch from one global generator, so a sample's captions
would depend on what else was in its batch (and Ray Data forms batches as blocks arrive). Here each row
(image i, caption j) draws its token at step t from a uniform that is a hash of (the sample's seed, j, t):
`SeededTopP` is a logits processor that does the top-p draw itself and leaves only the drawn token
finite, so the sampler that runs after it has nothing left to choose. The same image, seed and model
give the same captions in any batch (on a GPU, up to the float differences of another batch shape).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from transformers import LogitsProcessor

_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def sample_seed(seed: int, shard: str, index: int) -> int:
    """A sample's seed from the job seed, its shard's file name and its index in the shard (63 bits)."""
    digest = hashlib.blake2b(f"{int(seed)}:{shard}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64: a cheap hash whose outputs look independent."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def row_seeds(sample_seeds, per_sample: int) -> np.ndarray:
    """One seed per generated row, in generate's order (each sample's `per_sample` rows together)."""
    seeds = np.repeat(np.asarray(sample_seeds, np.uint64), per_sample)
    return mix(seeds ^ mix(np.tile(np.arange(1, per_sample + 1, dtype=np.uint64), len(sample_seeds))))


def uniforms(seeds: np.ndarray, step: int) -> np.ndarray:
    """A uniform in [0, 1) per row for decoding step `step`."""
    z = mix(mix(seeds) ^ np.uint64(step))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


class SeededTopP(LogitsProcessor):
    """Top-p (nucleus) sampling with one seed per row; returns logits that are -inf but at the drawn token."""

    def __init__(self, seeds: np.ndarray, top_p: float) -> None:
        self.seeds, self.top_p = np.asarray(seeds, np.uint64), float(top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        u = torch.as_tensor(uniforms(self.seeds, input_ids.shape[1]), device=scores.device, dtype=torch.float64)
        probs, order = torch.softmax(scores.double(), dim=-1).sort(dim=-1, descending=True)
        before = probs.cumsum(-1) - probs
        kept = probs * (before < self.top_p)  # the smallest head reaching top_p (the first token always)
        cum = kept.cumsum(-1)
        target = u * cum[:, -1]
        last = (kept > 0).sum(-1) - 1
        pos = torch.minimum((cum <= target[:, None]).sum(-1), last)
        token = order.gather(-1, pos[:, None])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, token, 0.0)
