"""BLIP-2 stage-1 losses (spec §4.2-§4.4) as modules whose distributed behaviour is explicit.

`rank`/`world_size` given to a constructor are used as is; left as None they are read from
torch.distributed at call time (0/1 without a process group), so one module serves both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qformer.models.gather import all_gather_no_grad, all_gather_with_grad, dist_rank_world

NegativeSampler = Callable[[torch.Tensor], torch.Tensor]  # weights [B, C] -> indices [B]


def multinomial_negatives(weights: torch.Tensor) -> torch.Tensor:
    """One draw per row (LAVIS: torch.multinomial(weights[b], 1) per sample).

    A row that is not a distribution (NaN/inf from a diverged model) draws uniformly instead of making
    torch.multinomial raise: the NaN then reaches the loss, where the non-finite-loss handling (stop, or
    run.skip_nonfinite) deals with it. Finite rows are untouched (no host sync either way)."""
    ok = torch.isfinite(weights).all(dim=1, keepdim=True) & (weights.sum(dim=1, keepdim=True) > 0)
    return torch.multinomial(torch.where(ok, weights, torch.ones_like(weights)), 1).squeeze(1)


class _Distributed(nn.Module):
    def __init__(self, rank: int | None, world_size: int | None):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def rank_world(self) -> tuple[int, int]:
        rank, world = dist_rank_world()
        return (rank if self.rank is None else self.rank, world if self.world_size is None else self.world_size)


@dataclass
class ITCResult:
    loss: torch.Tensor
    sim_i2t: torch.Tensor  # [B, B*W], temperature-scaled, max over queries
    sim_t2i: torch.Tensor  # [B, B*W]


class ITCLoss(_Distributed):
    """Image-text contrastive loss, similarity = max over query embeddings / temp (no clamp).

    gather_with_grad=False (LAVIS): gathered features are detached, gradient only reaches the
    local features. True: gathered with gradient (OpenCLIP-style), so other ranks' rows also
    contribute gradient to this rank's features.
    """

    def __init__(
        self,
        rank: int | None = None,
        world_size: int | None = None,
        gather_with_grad: bool = False,
        label_smoothing: float = 0.1,
    ):
        super().__init__(rank, world_size)
        self.gather_with_grad = gather_with_grad
        self.label_smoothing = label_smoothing

    def forward(self, image_feats: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor) -> ITCResult:
        rank, world = self.rank_world()
        gather = all_gather_with_grad if self.gather_with_grad else all_gather_no_grad
        image_all = gather(image_feats, world)  # [B*W, Q, E]
        text_all = gather(text_feat, world)  # [B*W, E]
        # [B, B*W, Q] -> max over queries
        sim_i2t = torch.einsum("bqe,je->bjq", image_feats, text_all).amax(dim=-1) / temp
        sim_t2i = torch.einsum("be,jqe->bjq", text_feat, image_all).amax(dim=-1) / temp
        b = image_feats.shape[0]
        targets = torch.arange(rank * b, rank * b + b, device=image_feats.device)
        loss = 0.5 * (
            F.cross_entropy(sim_i2t, targets, label_smoothing=self.label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=self.label_smoothing)
        )
        return ITCResult(loss, sim_i2t, sim_t2i)


@dataclass
class ItmImages:
    """The image of each ITM row, by index into a pool: this rank's batch (rows 0..B-1) followed by
    `extra` embeddings (other ranks' negatives), so a matcher can reuse per-image work of the batch
    (the query pass's image K/V) instead of recomputing it for every row."""

    index: torch.Tensor  # [R] into cat(local batch, extra)
    local: torch.Tensor  # [B, N, D] this rank's image embeddings
    extra: torch.Tensor | None = None  # [M, N, D]

    def embeddings(self) -> torch.Tensor:
        """The rows as one [R, N, D] tensor (what a matcher without reuse needs)."""
        pool = self.local if self.extra is None else torch.cat([self.local, self.extra], dim=0)
        return pool[self.index]


class ITMLoss(_Distributed):
    """Image-text matching with one hard negative image per text and one text per image.

    Negatives are drawn from all ranks by `sampler` (default: one multinomial draw) from the
    softmax of the ITC similarities with the own positive masked: negatives="head" sets it to
    -10000 before the softmax (LAVIS HEAD); "release" adds 1e-4 after the softmax then zeroes it
    (Jan-Jun 2023 code). Image embeddings are gathered WITH gradient, token ids without.
    """

    def __init__(
        self,
        rank: int | None = None,
        world_size: int | None = None,
        negatives: str = "head",
        sampler: NegativeSampler = multinomial_negatives,
    ):
        super().__init__(rank, world_size)
        if negatives not in ("head", "release"):
            raise ValueError(f"model.itm_negatives must be 'head' or 'release', got {negatives!r}")
        self.negatives = negatives
        self.sampler = sampler

    @torch.no_grad()
    def negative_weights(self, sim: torch.Tensor, rank: int) -> torch.Tensor:
        b = sim.shape[0]
        rows = torch.arange(b, device=sim.device)
        sim = sim.detach().float().clone()
        if self.negatives == "head":
            sim[rows, rank * b + rows] = -10000.0
            return F.softmax(sim, dim=1)
        weights = F.softmax(sim, dim=1) + 1e-4
        weights[rows, rank * b + rows] = 0.0
        return weights

    def forward(
        self,
        itm_logits: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        image_embeds: torch.Tensor,
        text_ids: torch.Tensor,
        text_atts: torch.Tensor,
        sim_i2t: torch.Tensor,
        sim_t2i: torch.Tensor,
        by_index: bool = False,
    ) -> torch.Tensor:
        """`itm_logits(images, ids [3B,L], atts [3B,L]) -> [3B, 2]` runs the matching model on rows
        (positive pairs, a negative image per text, a negative text per image). `images` is the
        [3B,N,D] tensor, or with `by_index` an ItmImages: positives and negative texts use the
        local images; negative images are local too at world size 1, else rows gathered (with
        gradient) from all ranks, gathered on every rank so that the backward all-reduce matches."""
        rank, world = self.rank_world()
        b = text_ids.shape[0]
        ids_world = all_gather_no_grad(text_ids, world)
        atts_world = all_gather_no_grad(text_atts, world)
        neg_img = self.sampler(self.negative_weights(sim_t2i, rank))  # one image per local text
        neg_txt = self.sampler(self.negative_weights(sim_i2t, rank))  # one text per local image
        own = torch.arange(b, device=neg_img.device)
        if world == 1:
            images = ItmImages(torch.cat([own, neg_img, own]), image_embeds)
        else:
            image_world = all_gather_with_grad(image_embeds, world)
            images = ItmImages(torch.cat([own, own + b, own]), image_embeds, image_world[neg_img])
        ids = torch.cat([text_ids, text_ids, ids_world[neg_txt]], dim=0)
        atts = torch.cat([text_atts, text_atts, atts_world[neg_txt]], dim=0)
        logits = itm_logits(images if by_index else images.embeddings(), ids, atts)
        labels = torch.zeros(3 * b, dtype=torch.long, device=logits.device)  # made on the device: no copy, no sync
        labels[:b] = 1
        return F.cross_entropy(logits, labels)


class LMLoss(nn.Module):
    """Captioning loss: predict token t+1 from position t, label smoothing, -100 ignored, token mean."""

    def __init__(self, label_smoothing: float = 0.1, ignore_index: int = -100):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shifted = logits[:, :-1].contiguous()
        targets = labels[:, 1:].contiguous()
        return F.cross_entropy(
            shifted.view(-1, shifted.shape[-1]).float(),
            targets.view(-1),
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )


    def from_hidden(self, hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                    keep_index: torch.Tensor | None = None) -> torch.Tensor:
        """Same loss, but the vocabulary head runs only on positions with a target (pads skipped).

        Equal to `forward(head(hidden), labels)` since ignored positions add nothing to the mean;
        the vocabulary projection is the largest matmul of a small Q-Former, so this saves real time.
        `keep_index`: those positions as flat indices into [B, L-1], found on the host beforehand
        (Blip2Qformer.text_plan); without it a boolean mask finds them, a device sync on CUDA.
        """
        targets = labels[:, 1:]
        shifted = hidden[:, :-1]
        if keep_index is None:
            keep = targets != self.ignore_index
            logits, targets = head(shifted[keep]), targets[keep]
        else:
            logits = head(shifted.reshape(-1, shifted.shape[-1]).index_select(0, keep_index))
            targets = targets.reshape(-1).index_select(0, keep_index)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)


def lm_inputs(text_ids: torch.Tensor, bos_token_id: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder ids ([DEC] replaces [CLS] in column 0) and labels (pads -> -100)."""
    decoder_ids = text_ids.clone()
    decoder_ids[:, 0] = bos_token_id
    labels = decoder_ids.masked_fill(decoder_ids == pad_token_id, -100)
    return decoder_ids, labels
