"""Experiment configuration: LAVIS-compatible YAML, layered defaults, validation, explain.

    from qformer.config import load_config, ConfigError
    cfg = load_config("experiments/blip2/pretrain_stage1.yaml", ["run.init_lr=1e-3"])
"""
from qformer.core.errors import ConfigError

__all__ = ["ConfigError", "load_config", "load_config_dict"]


def __getattr__(name: str):
    # lazy: the loader (omegaconf) is imported on first use only: the model and the train step import this
    # package for ConfigError and must run where omegaconf is absent (a bare GPU box, see bench device).
    if name in ("load_config", "load_config_dict"):
        from qformer.config import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'qformer.config' has no attribute {name!r}")
