"""Device check: the GPU path in one short run (AMP fp16/bf16 steps, no host syncs, DDP, cache ratio).

For a machine lent for a few minutes: torch, transformers and timm only (no Ray, MLflow, omegaconf)
and no internet. The model is built directly, with a random BERT written to a temporary directory
(BERT-base dims) and a random EVA ViT-g/14 (fp16) unless --small. Per AMP policy it times the real
`train_step` on images (online frozen ViT) and on precomputed ViT features (run.vision_cache: the
fp16 features cross host->device each step, as from a cache shard), steps alternating, and reports
their ratio (the cache's speed-up measured at this ViT), FLOP/s against the matmul peak in the same
dtype, and peak memory. Then: the forward/backward under torch's sync debug mode (host-side text
plan, pinned batch), accumulation through DDP (world size 1; NCCL on CUDA, gloo on CPU) with the workers'
settings, retrieval evaluation with the ITM re-rank, a checkpoint save and resume, one step at batch 100
(GPU memory), and the fp16 ViT-g features' error against fp32 (qformer.bench.vit_precision and
qformer.bench.device_paths). On CPU it runs small
(the test suite does). On a device machine: `python -m qformer.bench.device --device cuda`.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from qformer.bench import device_paths
from qformer.bench.common import _sync, measure_matmul_peak, train_state, write_result
from qformer.bench.step import _random_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--small", action="store_true", help="tiny ViT and BERT (default on CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 on CUDA, 4 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per path and policy (CUDA 8, CPU 2)")
    parser.add_argument("--out-dir", default=None, help="results directory (default experiments/benchmarks/results)")


def _write_random_bert(root: Path, small: bool) -> Path:
    """A random BERT (BERT-base dims and ~its 30522-token vocabulary unless `small`)."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.models.bert_init import write_random_bert

    words = [f"w{i}" for i in range(2000 if small else 30330)]
    if small:
        return write_random_bert(root, words)
    return write_random_bert(root, words, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072)


def build_model(bert_dir: Path, small: bool, device: str):
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    from qformer.models.blip2_qformer import Blip2Qformer

    torch.manual_seed(0)
    if small:
        model = Blip2Qformer(vit_model="timm:vit_tiny_patch16_224", img_size=32, vit_precision="fp32", num_query_token=4,
                             bert_model=str(bert_dir), vit_kwargs={"img_size": 32, "patch_size": 8, "depth": 1})
    else:  # LAVIS stage-1 shapes: EVA ViT-g/14 at 224 in fp16, 32 queries, BERT-base
        model = Blip2Qformer(vit_model="eva_clip_g", img_size=224, vit_precision="fp16", bert_model=str(bert_dir))
    return model.to(device).train()


class _RunCfg(dict):
    __getattr__ = dict.__getitem__


def _state(model, device: str, amp_dtype: str):
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.train.amp import resolve_amp

    run = _RunCfg(init_lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=100, weight_decay=0.05, max_epoch=1,
                  lr_sched="linear_warmup_cosine_lr")
    return train_state(model, run, resolve_amp(True, amp_dtype, device))


def _batches(model, batch: int, size: int, device: str) -> tuple[dict, dict]:
    """(online batch: uint8 images, cached batch: fp16 ViT features), host tensors, pinned on CUDA."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    from qformer.data.normalize import normalize_uint8

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
    ids, atts = _random_text(batch, model.max_txt_len, model.tokenizer, g)
    with torch.no_grad():
        feats = model.vit_features(normalize_uint8(images.to(device))).to("cpu", torch.float16)
    pin = (lambda t: t.pin_memory()) if device.startswith("cuda") else (lambda t: t)  # noqa: E731
    text = {"text_ids": pin(ids), "text_atts": pin(atts)}
    return {"image": pin(images), **text}, {"image_embeds": pin(feats), **text}


def _time_steps(state, batches: dict[str, dict], steps: int, device: str) -> dict[str, Any]:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    from qformer.train.step import train_step

    times: dict[str, list[float]] = {name: [] for name in batches}
    losses: dict[str, float] = {}
    for i in range(steps + 1):  # the first round warms up both paths
        for name, batch in batches.items():
            _sync(device)
            start = time.perf_counter()
            out = train_step(state, batch, epoch=0, iter_in_epoch=i)
            _sync(device)
            if i:
                times[name].append(time.perf_counter() - start)
            losses[name] = float(out.losses["loss"])
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    finite = all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    return {"step_seconds": median, "step_seconds_all": times, "last_loss": losses, "losses_finite": finite}


def _amp_policy(model, policy: str, batches, steps: int, device: str) -> dict[str, Any]:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    from qformer.models.flops import train_flops_per_sample

    state = _state(model, device, policy)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = _time_steps(state, batches, steps, device)
    batch = int(batches["online"]["text_ids"].shape[0])
    atts = batches["online"]["text_atts"]
    size = int(batches["online"]["image"].shape[-1])
    flops = train_flops_per_sample(model, size, int(atts.shape[1]), float(atts[:, 1:].sum(1).float().mean()))
    cached_flops = flops["total"] - flops["vit_forward"]
    dtype = state.amp.dtype or torch.float32
    peak = measure_matmul_peak(device, size=4096 if device.startswith("cuda") else 512, dtype=dtype, seconds=0.5)
    secs = result["step_seconds"]
    result.update({
        "amp": state.amp.describe(),
        "samples_per_s": {k: batch / v for k, v in secs.items()},
        "cache_speedup_measured": secs["online"] / secs["cached"],
        "cache_speedup_flops": flops["total"] / cached_flops,
        "achieved_over_matmul_peak": {"online": flops["total"] * batch / secs["online"] / peak,
                                      "cached": cached_flops * batch / secs["cached"] / peak},
        "matmul_peak_flops": peak,
        "grad_scale": state.scaler.get_scale() if state.scaler is not None else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
    })
    return result


def _sync_free(model, batch: dict, device: str) -> dict[str, Any]:
    """The hot part of train_step (copy, normalise, forward, backward) under the sync check."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.train.amp import resolve_amp
    from qformer.train.step import prepare_samples, with_text_plan
    from qformer.train.sync_check import no_device_sync

    amp = resolve_amp(True, "auto", device)
    planned = with_text_plan(batch, model)  # host side, before the region (as train_step does)
    try:
        with no_device_sync(device) as seen:
            samples = prepare_samples(planned, model.device)
            with amp.autocast():
                loss = model(samples).loss
            loss.backward()
        model.zero_grad(set_to_none=True)
        return {"ok": not seen, "syncs": list(seen)}
    except Exception as err:  # CUDA sync debug mode raises at the syncing call: report where
        model.zero_grad(set_to_none=True)
        return {"ok": False, "error": f"{type(err).__name__}: {err}", "where": traceback.format_exc(limit=-6)}


def _ddp(model, batch: dict, device: str, tmp: Path) -> dict[str, Any]:
    """Two optimiser steps of two micro-batches each (accumulation: the first under DDP's no_sync) through
    DistributedDataParallel (world size 1) with the training workers' settings (qformer.train.ddp)."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from qformer.train.ddp import ddp_options
    from qformer.train.step import prepare_samples, train_step, with_text_plan

    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp / 'ddp'}", rank=0, world_size=1)
    try:
        ids = [model.device.index] if device.startswith("cuda") else None
        wrapped = DistributedDataParallel(model, device_ids=ids, **ddp_options())  # as the training workers
        state = _state(model, device, "auto")
        state.model, state.accum_grad_iters = wrapped, 2
        losses = [float(train_step(state, batch, epoch=0, iter_in_epoch=i).losses["loss"]) for i in range(4)]
        trainable = [p for p in model.parameters() if p.requires_grad]
        with state.amp.autocast():  # a synced backward: DDP's buckets hold the gradients (the step clears them)
            wrapped(prepare_samples(with_text_plan(batch, model), model.device)).loss.backward()
        grad_storages = len({p.grad.untyped_storage().data_ptr() for p in trainable if p.grad is not None})
        model.zero_grad(set_to_none=True)
        return {"ok": all(torch.isfinite(torch.tensor(losses))) and state.optimizer_steps + state.skipped_overflow == 2,
                "backend": backend, "losses": losses, "optimizer_steps": state.optimizer_steps,
                "grad_storages": grad_storages, "trainable_params": len(trainable), "options": ddp_options()}
    except Exception as err:
        return {"ok": False, "backend": backend, "error": f"{type(err).__name__}: {err}"}
    finally:
        dist.destroy_process_group()


def _vit_fp16_error(device: str, small: bool) -> dict[str, Any]:
    """fp16 ViT features against fp32 (qformer.bench.vit_precision): full EVA ViT-g on a GPU, a small one here."""
    from qformer.bench.vit_precision import QUICK, measure

    try:
        if small:
            return measure("eva_clip_g", device, 2, 32, {**QUICK["eva_clip_g"], "patch_size": 8})
        return measure("eva_clip_g", device, 8, 224)
    except Exception as err:  # a figure, not a check: report why it is missing
        return {"error": f"{type(err).__name__}: {err}"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cuda = device.startswith("cuda")
    small = args.small or not cuda
    batch = args.batch_size or (32 if cuda else 4)
    steps = args.steps or (8 if cuda else 2)
    with tempfile.TemporaryDirectory(prefix="qformer-device-") as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        model = build_model(_write_random_bert(tmp, small), small, device)
        online, cached = _batches(model, batch, 32 if small else 224, device)
        payload: dict[str, Any] = {"device": device, "small": small, "batch_size": batch, "timed_steps": steps,
                                   "build_seconds": time.perf_counter() - start,
                                   "vit": type(model.visual_encoder).__name__, "vit_fp16": model.vit_fp16}
        policies = ["fp16", "bf16"] if cuda else ["bf16"]
        payload["amp"] = {p: _amp_policy(model, p, {"online": online, "cached": cached}, steps, device) for p in policies}
        payload["sync_free_step"] = _sync_free(model, online, device)
        payload["ddp_world_1"] = _ddp(model, online, device, tmp)
        size, auto = (32 if small else 224), _state(model, device, "auto")
        payload["eval_rerank"] = device_paths.eval_rerank(model, device, tmp, size, auto.amp.dtype)
        payload["checkpoint_resume"] = device_paths.checkpoint_resume(auto, online, tmp)
        if cuda:
            payload["batch_100_memory"] = device_paths.batch_memory(
                model, _state(model, device, "fp16"), lambda n: _batches(model, n, size, device)[0])
    payload["vit_fp16_error"] = _vit_fp16_error(device, small)
    checks = ("sync_free_step", "ddp_world_1", "eval_rerank", "checkpoint_resume", "batch_100_memory")
    payload["ok"] = (all(r["losses_finite"] for r in payload["amp"].values())
                     and all(payload[k]["ok"] for k in checks if k in payload))
    path = write_result("device", payload, args.out_dir)
    print(f"device check on {device} ({'small' if small else 'EVA ViT-g + BERT-base'}, batch {batch}):")
    for policy, r in payload["amp"].items():
        sps = r["samples_per_s"]
        print(f"  {r['amp']}: online {sps['online']:.1f} / cached {sps['cached']:.1f} samples/s -> cache "
              f"{r['cache_speedup_measured']:.2f}x measured ({r['cache_speedup_flops']:.2f}x by FLOPs); "
              f"of matmul peak: online {r['achieved_over_matmul_peak']['online']:.0%}, "
              f"cached {r['achieved_over_matmul_peak']['cached']:.0%}; losses finite {r['losses_finite']}")
    print(f"  no host sync in copy+forward+backward: {payload['sync_free_step']}")
    for key in checks[1:]:
        if key in payload:
            print(f"  {key}: {payload[key]}")
    vit_error = payload["vit_fp16_error"].get("error_vs_fp32", payload["vit_fp16_error"])
    print(f"  fp16 ViT features against fp32 (relative): {vit_error}")
    print(f"  all ok: {payload['ok']} -> {path}")
    return payload


if __name__ == "__main__":  # `python -m qformer.bench.device`: skips the CLI, whose config layer needs omegaconf
    _parser = argparse.ArgumentParser(prog="python -m qformer.bench.device", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    run(_parser.parse_args())
