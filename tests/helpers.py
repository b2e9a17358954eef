"""Builders the tests share: the tiny model section and the few-step run config training tests start from.

The model is `model_type: tiny` (a small frozen timm ViT) with the session's random test BERT (the
`tiny_bert` fixture: 4 layers, 64 wide, the synthetic captions' vocabulary), so that a checkpoint with
its AdamW state is ~12 MB (7 of them the random ViT, which travels with it); tests about the shipped
MiniLM itself use `minilm_path` instead.
"""
from __future__ import annotations

import itertools
import socket
from pathlib import Path

from omegaconf import OmegaConf

from qformer.config import load_config_dict


def tiny_model(bert: str | Path, **over) -> dict:
    """`model:` for the tiny BLIP-2 with `bert` as its text tower: 4 queries, 16 text tokens."""
    return {"arch": "blip2", "model_type": "tiny", "num_query_token": 4, "max_txt_len": 16, "bert_model": str(bert),
            **over}


def merged(base: dict, over: dict) -> dict:
    """`base` updated by `over`; a dict value updates the dict it replaces instead (one level deep)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_run(out: Path, name: str = "run", **run) -> dict:
    """`run:` for a few fp32 CPU steps at batch 4, no evaluation, MLflow in a sqlite file under `out`."""
    base = {"batch_size_train": 4, "batch_size_eval": 4, "init_lr": 1e-4, "min_lr": 1e-5, "warmup_lr": 0.0,
            "warmup_steps": 2, "max_epoch": 1, "log_freq": 1, "k_test": 2, "output_dir": str(out / name),
            "valid_splits": [], "test_splits": [], "amp": False, "data": {"batch_size": 4},
            "mlflow": {"tracking_uri": f"sqlite:///{out}/mlflow.db", "experiment_name": "tests"}}
    return merged(base, run)


def tiny_config(bert: str | Path, datasets: dict, run: dict | None = None, model: dict | None = None,
                options: list[str] | None = None):
    """The validated config of the tiny model over `datasets` (see `tiny_run` for a training run)."""
    return load_config_dict({"model": tiny_model(bert, **(model or {})), "datasets": datasets, "run": run or {}},
                            options)


def data_config(datasets: dict, model: dict | None = None, **run):
    """The packaged tiny config over `datasets`, for tests that read data and build no model: its text
    processing is the shipped MiniLM's (bert-base-uncased vocabulary, 32 tokens)."""
    return load_config_dict({"model": {"arch": "blip2", "model_type": "tiny", **(model or {})}, "datasets": datasets,
                             "run": run})


def tiny_options(bert: str | Path) -> list[str]:
    """`--options` that give a packaged or experiment config (e.g. the demo's) the tiny test model."""
    return [f"model.bert_model={bert}", "model.num_query_token=4", "model.max_txt_len=16"]


def small_model_cfg(bert: str | Path, **over):
    """`model:` of the smallest real Blip2Qformer, built without a data set or a run: a 1-block timm ViT
    at 32 px (8 px patches: 17 tokens) and `bert`, 4 queries, 16 text tokens, 16-d ITC space."""
    cfg = {"arch": "blip2", "model_type": "tiny", "load_pretrained": False, "vit_model": "timm:vit_tiny_patch16_224",
           "vit_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}, "image_size": 32, "vit_precision": "fp32",
           "num_query_token": 4, "bert_model": str(bert), "max_txt_len": 16, "embed_dim": 16}
    return OmegaConf.create(merged(cfg, over))


def small_model(bert: str | Path, seed: int = 0, **over):
    """`small_model_cfg`'s model, seeded, in eval mode: dropout does not differ between two runs compared."""
    import torch

    from qformer.models import build_model

    torch.manual_seed(seed)
    return build_model(small_model_cfg(bert, **over)).eval()


def shards_config(bert: str | Path, tmp_path: Path, storage: str, name: str, run: dict | None = None,
                  data: dict | None = None, more_datasets: dict | None = None):
    """The tiny model at 64 px trained on the shards `storage` names (dataset `web`), 8-row read chunks."""
    datasets = {"web": {"builder": "image_text_shards", "build_info": {"storage": storage},
                        "vis_processor": {"train": {"name": "blip2_image_train", "image_size": 64}}},
                **(more_datasets or {})}
    return tiny_config(bert, datasets, tiny_run(tmp_path, name, data={"batch_size": 8, "task_rows": 8, **(data or {})},
                                                mlflow={"experiment_name": "test-shards"}, **(run or {})),
                       model={"image_size": 64})


def audit_rows(path: Path) -> list[tuple[int, list[int]]]:
    """(step, row ids) per micro-batch of a training audit (run.data.audit_dir): a folder (rank 0) or a file."""
    import json

    path = Path(path)
    path = path / "rows-rank0.jsonl" if path.is_dir() else path
    return [(r["step"], r["ids"]) for r in map(json.loads, path.read_text().splitlines())]


def free_port() -> int:
    """A loopback port no one listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def short_tmp_dir(tmp_path_factory, prefix: str) -> str:
    """A new folder with a short path under pytest's temp root, for a Ray temp dir: Ray puts unix sockets under
    it, whose paths may not exceed 107 bytes. Under pytest-xdist the worker's base temp (`.../popen-gwN`) is
    one level too deep for that, so the folder goes beside it, still inside the root pytest cleans."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if base.name.startswith("popen-gw") else base
    for n in itertools.count():  # `prefix0`, `prefix1`, ...: mkdtemp's 8 random characters would not fit
        try:
            (root / f"{prefix}{n}").mkdir()
            return str(root / f"{prefix}{n}")
        except FileExistsError:  # another test, or the other xdist worker, took it
            continue
