"""Experiment configuration: LAVIS-compatible YAML, layered defaults, validation, explain.

    from qformer.config import load_config, ConfigError
    cfg = load_config("experiments/blip2/pretrain_stage1.yaml", ["run.init_lr=1e-3"])
"""
from qformer.config.errors import ConfigError
from qformer.config.loader import load_config, load_config_dict

__all__ = ["ConfigError", "load_config", "load_config_dict"]
