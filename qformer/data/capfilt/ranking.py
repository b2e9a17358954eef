"""Which captions a sample keeps, and what a shard's (and the job's) keeping looked like.

Candidates are the original web caption(s) first, then the synthetic ones; an empty or non-text caption is
no candidate (so an original that is not text is scored out), and a repeated text counts once (its first
place kept). They are ranked by the CLIP image-text similarity, a stable sort (ties keep candidate order),
and the top `keep` stay. The statistics are counts plus fixed-bin histograms of the similarities, so the
shards' statistics add up to the job's exactly, whichever run wrote which shard.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

BINS = 200  # histogram bins over a cosine similarity's [-1, 1]: 0.01 wide


def candidates(originals: list[str], generated: list[str]) -> tuple[list[str], int]:
    """(candidate texts, how many of them are originals): non-empty, stripped, each text once, originals first."""
    out: list[str] = []
    n_original = 0
    for i, text in enumerate([*originals, *generated]):
        text = text.strip() if isinstance(text, str) else ""
        if text and text not in out:
            out.append(text)
            n_original += i < len(originals)
    return out, n_original


@dataclass(frozen=True)
class Kept:
    captions: list[str]
    scores: list[float]
    original_kept: bool  # an original caption is among the kept ones
    original_score: float | None  # the best original's similarity (None: no usable original)

    def to_json(self) -> str:
        return json.dumps({"captions": self.captions, "scores": self.scores, "original_kept": self.original_kept,
                           "original_score": self.original_score})

    @classmethod
    def from_json(cls, text: str) -> "Kept":
        d = json.loads(text)
        return cls(d["captions"], d["scores"], d["original_kept"], d["original_score"])


def keep_top(texts: list[str], scores: np.ndarray, n_original: int, keep: int) -> Kept:
    """The `keep` best of `texts` (the first `n_original` of them original) by `scores`, best first."""
    scores = np.asarray(scores, np.float64)
    order = np.argsort(-scores, kind="stable")[:keep]
    best_original = float(scores[:n_original].max()) if n_original else None
    return Kept([texts[i] for i in order], [round(float(scores[i]), 6) for i in order],
                bool((order < n_original).any()), None if best_original is None else round(best_original, 6))


def _hist(values: list[float]) -> np.ndarray:
    return np.histogram(np.clip(values, -1, 1), bins=BINS, range=(-1.0, 1.0))[0] if values else np.zeros(BINS, np.int64)


@dataclass
class ShardStats:
    """One output shard's counts; `add` merges another's (the job's summary is the sum over shards)."""

    samples: int = 0  # written
    captioned: int = 0  # samples whose image decoded (they got synthetic captions)
    undecodable: int = 0  # passed through with their original caption(s) only
    with_original: int = 0  # samples with a usable original caption
    original_kept: int = 0
    lost: Counter = field(default_factory=Counter)  # samples the input shard lost at reading, by reason
    kept_hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))  # all kept captions' scores
    top_hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))  # each sample's best score
    original_hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))  # the originals' scores

    def count(self, kept: Kept | None, has_original: bool) -> None:
        """One written sample; `kept` None: its image did not decode."""
        self.samples += 1
        self.with_original += has_original
        if kept is None:
            self.undecodable += 1
            return
        self.captioned += 1
        self.original_kept += kept.original_kept
        self.kept_hist += _hist(kept.scores)
        self.top_hist += _hist(kept.scores[:1])
        if kept.original_score is not None:
            self.original_hist += _hist([kept.original_score])

    def add(self, other: "ShardStats") -> None:
        for name in ("samples", "captioned", "undecodable", "with_original", "original_kept"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lost.update(other.lost)
        for name in ("kept_hist", "top_hist", "original_hist"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict:
        return {"samples": self.samples, "captioned": self.captioned, "undecodable": self.undecodable,
                "with_original": self.with_original, "original_kept": self.original_kept, "lost": dict(self.lost),
                "kept_hist": self.kept_hist.tolist(), "top_hist": self.top_hist.tolist(),
                "original_hist": self.original_hist.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardStats":
        return cls(d["samples"], d["captioned"], d["undecodable"], d["with_original"], d["original_kept"],
                   Counter(d.get("lost") or {}), *(np.asarray(d[k], np.int64) for k in ("kept_hist", "top_hist",
                                                                                       "original_hist")))

    def summary(self) -> dict:
        """Rates and score quantiles (from the 0.01-wide bins) for the summary JSON and MLflow."""
        captioned_with_original = int(self.original_hist.sum())
        return {"samples": self.samples, "captioned": self.captioned, "undecodable": self.undecodable,
                "no_original_caption": self.samples - self.with_original, "lost_at_read": dict(self.lost),
                "original_kept": self.original_kept,
                "original_kept_rate": self.original_kept / captioned_with_original if captioned_with_original else None,
                "kept_score": quantiles(self.kept_hist), "top_score": quantiles(self.top_hist),
                "original_score": quantiles(self.original_hist)}


def quantiles(hist: np.ndarray, qs=(0.1, 0.5, 0.9)) -> dict:
    """{'p10', 'p50', 'p90', 'mean', 'n'} of histogrammed values (bin centres); empty: {'n': 0}."""
    n = int(hist.sum())
    if not n:
        return {"n": 0}
    centres = -1.0 + (np.arange(BINS) + 0.5) * (2.0 / BINS)
    cum = np.cumsum(hist)
    out = {f"p{int(q * 100)}": round(float(centres[int(np.searchsorted(cum, q * n))]), 3) for q in qs}
    out["mean"] = round(float((centres * hist).sum() / n), 3)
    out["n"] = n
    return out
