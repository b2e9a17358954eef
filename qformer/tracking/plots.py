"""Pictures drawn from a run's own metrics: the loss curves, an elastic run's worker groups (PNG, headless)."""
from __future__ import annotations

import io
from typing import Mapping, Sequence

LOSS_CURVE_KEYS = ("loss", "loss_itc", "loss_itm", "loss_lm")


def _pyplot():
    # imported here: every training worker imports this module, only the end of a run draws (0.5 s saved
    # on each worker start)
    import matplotlib

    matplotlib.use("Agg")  # workers and CI have no display
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def loss_curve_png(histories: Mapping[str, Sequence[tuple[int, float]]]) -> bytes:
    """One line per key over the global step; keys without values are left out."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    drawn = False
    for key, history in histories.items():
        if history:
            ax.plot([s for s, _ in history], [v for _, v in history], label=key)
            drawn = True
    ax.set_xlabel("global step (micro-batches)")
    ax.set_ylabel("loss")
    ax.set_title("training losses")
    if drawn:
        ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig)


def world_size_png(loss: Sequence[tuple[int, float]], world: Sequence[tuple[int, float]],
                   marks: Mapping[str, Sequence[int]], title: str = "elastic run") -> bytes:
    """An elastic run's loss over the step above the world size that trained each step (its MLflow series, a
    step function: each group's value from the step it began; at a step logged twice the last value counts),
    with a dashed line at each step in `marks` (label -> steps, e.g. the grow and preemption checkpoints)."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 4.5), dpi=100, height_ratios=(2, 1))
    top.plot([s for s, _ in loss], [v for _, v in loss], color="tab:blue", label="loss")
    top.set_ylabel("loss")
    top.set_title(title)
    kept = dict(world)  # per step, the value logged last
    last = max((s for s, _ in loss), default=max(kept, default=1))
    steps = sorted(kept)
    if steps:  # held to the last step
        bottom.step(steps + [last], [kept[s] for s in steps + steps[-1:]], where="post", color="tab:green",
                    label="world_size")
    bottom.set_ylabel("workers")
    bottom.set_xlabel("global step")
    bottom.set_ylim(0, max(kept.values(), default=1) + 0.5)
    for (label, at), color in zip(marks.items(), ("tab:orange", "tab:red", "tab:purple")):
        for i, step in enumerate(at):
            for ax in (top, bottom):
                ax.axvline(step, color=color, linestyle="--", alpha=0.7, label=label if i == 0 and ax is top else None)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    return _png(fig)
