"""Data: annotation readers, builders, processors, the Ray Data pipeline, synthetic data.

Importing this package registers the builders (`coco_caption`, `vg_caption`) and processors.
Heavy pieces (Ray, transformers) are imported inside functions.
"""
from qformer.data import builders, processors  # noqa: F401  (registers)
