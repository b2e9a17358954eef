"""How the training step wraps the model in DistributedDataParallel (Ray Train's prepare_model, the device check).

- No buffer sync before each forward: DDP's default re-sends every buffer from rank 0 at each forward; the
  model's only buffers are the Q-Former's constant position ids (no BatchNorm statistics), so that is a
  collective per forward for nothing. (torch 2.14 names it `forward_sync_buffers`, older `broadcast_buffers`;
  both keep the one sync at construction.)
- `gradient_as_bucket_view=True`: the parameters' gradients are views into DDP's all-reduce buckets instead
  of a second copy of them (the Q-Former's gradients, ~0.4 GB in fp32 at BERT-base size, held once).
"""
from __future__ import annotations

import inspect
from typing import Any


def ddp_options() -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    known = inspect.signature(DistributedDataParallel.__init__).parameters
    no_forward_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in known else {"broadcast_buffers": False}
    return {**no_forward_sync, "gradient_as_bucket_view": True}
