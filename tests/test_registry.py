"""Registry (clear errors for unknown and duplicate names) and seeding (seed + rank)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from qformer.core import registry
from qformer.core.registry import RegistryError
from qformer.core.seeding import setup_seeds


def test_register_and_look_up_a_user_class():
    @registry.register_processor("test_reg_upper_caption")
    class UpperCaption:
        pass

    assert registry.get_processor_class("test_reg_upper_caption") is UpperCaption
    assert "test_reg_upper_caption" in registry.list_names("processor")


def test_duplicate_name_raises_and_keeps_the_first():
    @registry.register_model("test_reg_dup_model")
    class First:
        pass

    class Second:
        pass

    with pytest.raises(RegistryError, match="'test_reg_dup_model' is already registered to .*First"):
        registry.register_model("test_reg_dup_model")(Second)
    assert registry.get_model_class("test_reg_dup_model") is First
    # registering the same class again (a module imported twice) is harmless
    registry.register_model("test_reg_dup_model")(First)
    assert isinstance(RegistryError("x"), KeyError)  # LAVIS raised KeyError for duplicates


def test_unknown_name_lists_known_names_with_suggestion():
    with pytest.raises(RegistryError) as info:
        registry.get_builder_class("coco_captoin")
    message = str(info.value)
    assert "unknown builder 'coco_captoin'" in message
    assert "Did you mean 'coco_caption'?" in message
    assert "Known builders:" in message and "coco_caption" in message.split("Known builders:")[1]


def test_builtin_names_are_registered():
    assert "blip2" in registry.list_names("model")
    assert {"blip_caption", "blip_image_train", "blip_image_eval", "blip2_image_train"} <= set(
        registry.list_names("processor"))
    assert {"coco_caption"} <= set(registry.list_names("builder"))


def test_config_known_processors_match_the_registry():
    # qformer.config checks processor names without importing the data package; keep its list true.
    from qformer.config.packaged import BUILTIN_PROCESSORS

    assert set(BUILTIN_PROCESSORS) <= set(registry.list_names("processor"))


def test_setup_seeds_uses_seed_plus_rank_for_python_numpy_torch():
    import torch

    value = setup_seeds(42, rank=3)
    assert value == 45
    got = (random.random(), np.random.rand(), torch.rand(1).item())
    expected = (random.Random(45).random(), np.random.RandomState(45).rand(), torch.Generator().manual_seed(45))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert got[2] == torch.rand(1, generator=expected[2]).item()
    # different ranks draw different streams, the same rank repeats
    setup_seeds(42, rank=0)
    rank0 = random.random()
    setup_seeds(42, rank=0)
    assert random.random() == rank0 != got[0]
