"""Seeds as LAVIS's train.py sets them: seed + rank for python, numpy and torch."""
from __future__ import annotations

import random

import numpy as np


def setup_seeds(seed: int, rank: int = 0) -> int:
    import torch  # lazy: qformer.core stays free of torch (light modules such as the bench suites import this)

    value = int(seed) + int(rank)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    # LAVIS trades cuDNN autotuning for run-to-run reproducibility.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return value
