"""Training step: samples/s, peak memory and achieved FLOP/s vs the measured matmul peak.

One step = Blip2Qformer forward (frozen ViT + 4 Q-Former passes, ITC+ITM+LM) + backward + AdamW,
on random images and random token ids (lengths drawn like real captions), as the training loop
does it (CUDA: fp16 autocast + GradScaler; CPU: fp32, or bf16 autocast with --bf16). Model FLOPs
per sample are analytic (qformer.models.flops): 3 x Q-Former forward + ViT forward. The matmul
peak is measured in the same process right after, in the same dtype, so the ratio compares like
with like on whatever else the machine is doing. The ITM pass's reuse of the query pass's image K/V
(Blip2Qformer.reuse_itm_kv) is timed against recomputing them (LAVIS), steps alternating, as a ratio.
"""
from __future__ import annotations

import argparse
import resource
import time

from qformer.bench.common import measure_matmul_peak, write_result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg-path", default="experiments/demo/tiny_shapes.yaml")
    parser.add_argument("--options", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds, for CI smoke runs)")
    parser.add_argument("--batch-size", type=int, default=None, help="default run.batch_size_train (quick: 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after 1 warm-up (default 5; quick 2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--bf16", action="store_true", help="CPU: bf16 autocast (default fp32)")
    parser.add_argument("--features", action="store_true",
                        help="feed frozen-ViT features (the run.vision_cache step): the ViT runs once, not per step")
    parser.add_argument("--out-dir", default=None, help="results directory (default experiments/benchmarks/results)")


def _random_text(b: int, length: int, tokenizer, generator):
    """Random word ids between [CLS] and [SEP], right-padded to random lengths: a text batch of `tokenizer`'s vocabulary."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    vocab = len(tokenizer) - 1  # not the added [DEC]
    lengths = torch.randint(max(3, length // 3), length + 1, (b,), generator=generator)
    ids = torch.randint(min(1000, vocab // 2), min(vocab, 29000), (b, length), generator=generator)  # ordinary words
    atts = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[:, 0] = tokenizer.cls_token_id
    ids[torch.arange(b), lengths - 1] = tokenizer.sep_token_id
    return ids * atts, atts


def run(args: argparse.Namespace) -> dict:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    from qformer.config import load_config
    from qformer.models import build_model
    from qformer.models.flops import train_flops_per_sample

    cfg = load_config(args.cfg_path, args.options)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    batch = args.batch_size or (4 if args.quick else int(cfg.run.batch_size_train))
    steps = args.steps or (2 if args.quick else 5)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    opt = torch.optim.AdamW(model.get_optimizer_params(float(cfg.run.weight_decay)), lr=1e-5)
    cuda = device.startswith("cuda")
    dtype = torch.float16 if cuda else (torch.bfloat16 if args.bf16 else torch.float32)
    autocast = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype, enabled=cuda or args.bf16)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)

    g = torch.Generator().manual_seed(0)
    size, length = int(cfg.model.image_size), int(cfg.model.max_txt_len)
    image = torch.randn(batch, 3, size, size, generator=g).to(device)
    ids, atts = _random_text(batch, length, model.tokenizer, g)
    samples = {"image": image, "text_ids": ids.to(device), "text_atts": atts.to(device)}
    if args.features:
        with autocast:
            samples["image_embeds"] = model.vit_features(samples.pop("image")).float()

    def step(reuse_itm_kv: bool = True) -> dict:
        model.reuse_itm_kv = reuse_itm_kv
        with autocast:
            out = model(samples)
        scaler.scale(out.loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return {k: float(getattr(out, k).detach()) for k in ("loss", "loss_itc", "loss_itm", "loss_lm")}

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up (allocator, kernels, lazy init)
    _sync(device)
    step(False)
    _sync(device)
    times, times_recompute, losses = [], [], {}
    for _ in range(steps):  # alternating, so that load from other processes hits both alike
        for reuse, into in ((True, times), (False, times_recompute)):
            start = time.perf_counter()
            out = step(reuse)
            _sync(device)
            into.append(time.perf_counter() - start)
            losses = out if reuse else losses
    median = lambda t: sorted(t)[len(t) // 2]  # noqa: E731  (robust to a stray slow step on a shared host)
    step_time = median(times)
    peak_mem = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    lm_targets = float((atts[:, 1:].sum(1)).float().mean())  # non-pad predicted positions per caption
    model.reuse_itm_kv = False
    flops_recompute = train_flops_per_sample(model, size, length, lm_targets)["total"]
    model.reuse_itm_kv = True
    flops = train_flops_per_sample(model, size, length, lm_targets)
    if args.features:
        flops_recompute -= flops["vit_forward"]
        flops["total"] -= flops["vit_forward"]
        flops["vit_forward"] = 0.0
    samples_per_s = batch / step_time
    achieved = flops["total"] * samples_per_s
    peak = measure_matmul_peak(device, size=2048 if cuda else 1024, dtype=dtype, seconds=0.5 if args.quick else 1.0)
    payload = {
        "cfg_path": args.cfg_path, "options": args.options, "features": bool(args.features), "device": device, "dtype": str(dtype).replace("torch.", ""),
        "batch_size": batch, "timed_steps": steps, "step_times_s": times, "step_time_s": step_time,
        "samples_per_s": samples_per_s, "peak_memory_bytes": int(peak_mem),
        "peak_memory_kind": "cuda max_memory_allocated" if cuda else "process max RSS",
        "model_flops_per_sample": flops, "lm_targets": lm_targets,
        "achieved_flops": achieved, "matmul_peak_flops": peak,
        "achieved_over_matmul_peak": achieved / peak, "last_losses": losses,
        "step_time_recompute_itm_kv_s": median(times_recompute),
        "speedup_itm_kv_reuse": median(times_recompute) / step_time,
        "flops_ratio_itm_kv_reuse": flops_recompute / flops["total"],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    path = write_result("step", payload, args.out_dir)
    print(
        f"step: {samples_per_s:.2f} samples/s (batch {batch}, {step_time * 1e3:.0f} ms/step, {device} {payload['dtype']}), "
        f"peak mem {peak_mem / 2**20:.0f} MiB, {flops['total'] / 1e9:.2f} GFLOP/sample, "
        f"{achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.1%} of measured matmul peak {peak / 1e9:.1f} GFLOP/s; "
        f"ITM K/V reuse {payload['speedup_itm_kv_reuse']:.2f}x vs recomputing "
        f"({payload['flops_ratio_itm_kv_reuse']:.2f}x fewer FLOPs) -> {path}"
    )
    return payload


def _sync(device: str) -> None:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
