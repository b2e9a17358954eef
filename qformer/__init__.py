"""qformer-platform: BLIP-2 stage-1 (Q-Former) pretraining on Ray, tracked in MLflow."""

__version__ = "0.1.0"
