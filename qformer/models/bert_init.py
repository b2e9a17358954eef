"""Initialise the Q-Former and its tokenizer from a pretrained BERT checkpoint (spec §3.2, §3.4).

`model.bert_model` is a hub name (`bert-base-uncased`, read through the huggingface_hub cache),
a local directory, or `pkg:<module>` for a Python package exposing `get_model_path()` (the
offline MiniLM BERT the tests and the demo use).
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import safetensors.torch
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from transformers import BertTokenizer

from qformer.core.uri_files import is_object_uri, local_copy
from qformer.models.checkpoint_io import torch_load
from qformer.models.qformer_bert import BertLMHeadModel

log = logging.getLogger(__name__)

DEC_TOKEN = "[DEC]"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def resolve_bert_dir(bert_model: str) -> Path:
    """Local directory holding config.json, vocab.txt and the weights for `model.bert_model`."""
    if bert_model.startswith("pkg:"):
        name = bert_model[4:]
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            raise ValueError(f"model.bert_model={bert_model!r}: cannot import package {name!r}") from err
        if not hasattr(module, "get_model_path"):
            raise ValueError(f"model.bert_model={bert_model!r}: package {name!r} has no get_model_path()")
        return Path(module.get_model_path())
    if is_object_uri(bert_model):  # a folder in object storage (`qformer weights fetch --to s3://...`): copied once
        try:
            return local_copy(bert_model)
        except FileNotFoundError as err:
            raise ValueError(f"model.bert_model={bert_model!r}: {err}") from None
    path = Path(bert_model).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or bert_model.startswith("."):
        raise ValueError(f"model.bert_model={bert_model!r}: directory not found")
    return _hub_snapshot(bert_model)


def _hub_snapshot(repo_id: str) -> Path:
    try:
        config = Path(hf_hub_download(repo_id, "config.json"))
        hf_hub_download(repo_id, "vocab.txt")
        for optional in ("tokenizer_config.json",):
            try:
                hf_hub_download(repo_id, optional)
            except EntryNotFoundError:
                pass
        for name in _WEIGHT_FILES:
            try:
                hf_hub_download(repo_id, name)
                break
            except EntryNotFoundError:
                continue
    except Exception as err:  # offline without a cache, unknown repo, ...
        raise ValueError(f"model.bert_model={repo_id!r}: not a local directory and not loadable from the hub ({err})") from err
    return config.parent


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_random_bert(root: Path, words: list[str], *, hidden_size: int = 64, num_hidden_layers: int = 2,
                      num_attention_heads: int = 4, intermediate_size: int = 128, seed: int = 0) -> Path:
    """A BERT directory `model.bert_model` accepts (config, random weights, word-piece vocabulary), for
    machines that cannot download one: the tests' small text tower and the device check's BERT-base.

    The vocabulary is BERT's special tokens, every printable ASCII character (and its `##` continuation,
    so any ASCII text tokenizes without [UNK]) and `words` as whole tokens."""
    from transformers import BertConfig, BertModel  # lazy: only tests and benches write one

    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]  # uncased: no capitals
    vocab = list(dict.fromkeys([*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars), *words]))
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                        num_attention_heads=num_attention_heads, intermediate_size=intermediate_size)
    BertModel(config).save_pretrained(str(root))
    return root


def read_bert_state_dict(bert_dir: Path) -> dict[str, torch.Tensor]:
    for name in _WEIGHT_FILES:
        file = bert_dir / name
        if file.exists():
            if name.endswith(".safetensors"):
                return safetensors.torch.load_file(str(file))
            return torch_load(file)
    raise ValueError(f"no BERT weights ({' or '.join(_WEIGHT_FILES)}) in {bert_dir}")


def _normalise_key(key: str) -> str:
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    return key[len("bert."):] if key.startswith("bert.") else key


def load_bert_weights(qformer: BertLMHeadModel, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy BERT weights into `qformer` (a `BertLMHeadModel`); returns loaded/skipped key lists.

    Embedding rows beyond the checkpoint's vocabulary (the added [DEC]) and the matching LM bias
    entries keep their fresh init (N(0, init_range) and 0). Parameters the checkpoint lacks
    (cross-attention, query FFNs, and the MLM head of BertModel-only checkpoints) stay fresh.
    """
    ours = qformer.state_dict()
    loaded, skipped = [], []
    with torch.no_grad():
        for raw_key, tensor in state.items():
            key = _normalise_key(raw_key)
            target = f"bert.{key}" if not key.startswith("cls.") else key
            if target not in ours:
                skipped.append(raw_key)  # pooler, NSP head, token_type_embeddings, ...
                continue
            param = ours[target]
            if target.endswith("word_embeddings.weight") or target == "cls.predictions.bias":
                if tensor.shape[0] > param.shape[0] or tensor.shape[1:] != param.shape[1:]:
                    raise ValueError(f"BERT weight {raw_key} has shape {tuple(tensor.shape)}, expected <= {tuple(param.shape)}")
                param[: tensor.shape[0]].copy_(tensor)
            elif tensor.shape != param.shape:
                raise ValueError(f"BERT weight {raw_key} has shape {tuple(tensor.shape)}, Q-Former expects {tuple(param.shape)}")
            else:
                param.copy_(tensor)
            loaded.append(target)
    return {"loaded": loaded, "skipped": skipped}


def copy_query_ffn_from_text(qformer: BertLMHeadModel) -> int:
    """Every `*_query*` parameter := its text twin (LAVIS does this after loading BERT)."""
    params = dict(qformer.named_parameters())
    n = 0
    with torch.no_grad():
        for name, param in params.items():
            if "_query" in name:
                param.copy_(params[name.replace("_query", "")])
                n += 1
    return n


def load_tokenizer(bert_dir: Path):
    """BertTokenizer (right truncation) + `[DEC]` as bos token; len == vocab + 1."""
    tokenizer = BertTokenizer.from_pretrained(str(bert_dir), truncation_side="right")
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer
