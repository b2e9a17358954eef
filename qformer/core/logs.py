"""One logging set-up for every process: rank 0 logs at INFO, other ranks only warnings."""
from __future__ import annotations

import logging
import sys


def setup_logging(rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    logger = logging.getLogger("qformer")
    logger.setLevel(level if rank == 0 else logging.WARNING)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [qformer rank {rank}] %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    return logger


def get_logger(name: str = "qformer") -> logging.Logger:
    return logging.getLogger(name if name.startswith("qformer") else f"qformer.{name}")
