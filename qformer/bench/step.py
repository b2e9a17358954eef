"""Training step: samples/s, peak memory and achieved FLOP/s vs the measured matmul peak, and the step
against the same step computed LAVIS's way.

One step = Blip2Qformer forward (frozen ViT + 4 Q-Former passes, ITC+ITM+LM) + backward + AdamW,
on random images and synthetic captions (qformer.data.synth's, tokenised to max_txt_len, so the padding
trim sees caption-like widths; `--random-text` draws random word ids and lengths instead), as the
training loop does it (CUDA: fp16 autocast + GradScaler; CPU: fp32, or bf16 autocast with --bf16).
Three paths share the weights and the batch, steps alternating so that other processes' load hits
them alike:
- `ours`: the text plan made on the host (padding trim, LM targets), the ITM pass reusing the query
  pass's image K/V, sparse word-embedding gradients, and the AdamW kernel `build_optimizer` picks (fused
  where torch has one);
- `recompute_itm_kv`: the same, projecting every ITM row's image K/V again (LAVIS's ITM pass);
- `lavis`: LAVIS's way: text at max_txt_len (no trim), K/V recomputed, dense word-embedding gradients
  (one zero-filled vocab x hidden tensor per text pass), torch's default AdamW kernel (the per-tensor
  loop on a CPU). It keeps what cannot be switched off: the last layer computing only
  the rows that are read, and the LM head only on target positions, so it is faster than LAVIS's code.
Their losses on the same weights (eval mode: no dropout; ITM negatives seeded alike) are compared
first. Model FLOPs per sample are analytic (qformer.models.flops): 3 x Q-Former forward + ViT forward.
The matmul peak is measured in the same process right after, in the same dtype.
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
    parser.add_argument("--random-text", action="store_true",
                        help="random word ids and lengths (most batches then use every column) instead of synthetic captions")
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


def _caption_text(b: int, length: int, tokenizer, seed: int = 0):
    """`b` synthetic captions (the demo data's generator) tokenised to `length` columns, as the data stream does."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import numpy as np

    from qformer.data.synth import captions, sample_scene

    rng = np.random.default_rng(seed)
    texts = [captions(sample_scene(rng), 1, rng)[0] for _ in range(b)]
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return tok.input_ids, tok.attention_mask


def run(args: argparse.Namespace) -> dict:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    from qformer.config import load_config
    from qformer.models import build_model
    from qformer.models.flops import train_flops_per_sample
    from qformer.train.optim import build_optimizer

    cfg = load_config(args.cfg_path, args.options)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    batch = args.batch_size or (4 if args.quick else int(cfg.run.batch_size_train))
    steps = args.steps or (2 if args.quick else 5)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    cuda = device.startswith("cuda")
    dtype = torch.float16 if cuda else (torch.bfloat16 if args.bf16 else torch.float32)
    autocast = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype, enabled=cuda or args.bf16)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    optimizers = {"ours": build_optimizer(model, cfg.run),
                  # LAVIS's AdamW: torch's default kernel for the device (the per-tensor loop on a CPU)
                  "lavis": torch.optim.AdamW(model.get_optimizer_params(float(cfg.run.weight_decay)),
                                             lr=float(cfg.run.init_lr), betas=(0.9, 0.999), eps=1e-8)}

    g = torch.Generator().manual_seed(0)
    size, length = int(cfg.model.image_size), int(cfg.model.max_txt_len)
    image = torch.randn(batch, 3, size, size, generator=g).to(device)
    ids, atts = (_random_text(batch, length, model.tokenizer, g) if args.random_text
                 else _caption_text(batch, length, model.tokenizer))
    plan = model.text_plan(ids, atts)  # on the host, before the copy (as train_step)
    samples = {"image": image, "text_ids": ids.to(device), "text_atts": atts.to(device)}
    if args.features:
        with autocast:
            samples["image_embeds"] = model.vit_features(samples.pop("image")).float()
    paths = {  # name -> (samples, reuse_itm_kv, optimizer)
        "ours": ({**samples, **plan}, True, optimizers["ours"]),
        "recompute_itm_kv": ({**samples, **plan}, False, optimizers["ours"]),
        "lavis": ({**samples, "text_width": length, "itm_text_width": length}, False, optimizers["lavis"]),
    }

    def forward(name: str):
        path_samples, reuse, _ = paths[name]
        model.reuse_itm_kv = reuse
        model.Qformer.bert.embeddings.sparse_word_grads = name != "lavis"
        with autocast:
            return model(path_samples)

    def step(name: str) -> dict:
        out = forward(name)
        opt = paths[name][2]
        scaler.scale(out.loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return {k: float(getattr(out, k).detach()) for k in ("loss", "loss_itc", "loss_itm", "loss_lm")}

    same_weights = _losses_alike(model, forward, list(paths))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for name in paths:  # warm-up (allocator, kernels, lazy init, optimiser state)
        step(name)
        _sync(device)
    times: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}  # CPU seconds: steadier than wall time on a shared host
    losses = {}
    for _ in range(steps):  # alternating, so that load from other processes hits every path alike
        for name, into in times.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            out = step(name)
            _sync(device)
            into.append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            losses = out if name == "ours" else losses
    median = lambda t: sorted(t)[len(t) // 2]  # noqa: E731  (robust to a stray slow step on a shared host)
    step_time = median(times["ours"])
    peak_mem = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    lm_targets = float((atts[:, 1:].sum(1)).float().mean())  # non-pad predicted positions per caption
    width = int(plan["text_width"])  # the text passes' columns after the trim
    model.reuse_itm_kv = False
    flops_recompute = train_flops_per_sample(model, size, width, lm_targets)["total"]
    model.reuse_itm_kv = True
    flops = train_flops_per_sample(model, size, width, lm_targets)
    if args.features:
        flops_recompute -= flops["vit_forward"]
        flops["total"] -= flops["vit_forward"]
        flops["vit_forward"] = 0.0
    samples_per_s = batch / step_time
    achieved = flops["total"] * samples_per_s
    peak = measure_matmul_peak(device, size=2048 if cuda else 1024, dtype=dtype, seconds=0.5 if args.quick else 1.0)
    payload = {
        "cfg_path": args.cfg_path, "options": args.options, "features": bool(args.features), "device": device, "dtype": str(dtype).replace("torch.", ""),
        "batch_size": batch, "timed_steps": steps, "step_times_s": times["ours"], "step_time_s": step_time,
        "samples_per_s": samples_per_s, "peak_memory_bytes": int(peak_mem),
        "peak_memory_kind": "cuda max_memory_allocated" if cuda else "process max RSS",
        "model_flops_per_sample": flops, "lm_targets": lm_targets,
        "achieved_flops": achieved, "matmul_peak_flops": peak,
        "achieved_over_matmul_peak": achieved / peak, "last_losses": losses,
        "text_width": plan["text_width"], "text_columns": length, "optimizer_kernel": _kernel(optimizers["ours"]),
        "step_time_recompute_itm_kv_s": median(times["recompute_itm_kv"]),
        "speedup_itm_kv_reuse": median(times["recompute_itm_kv"]) / step_time,
        "step_times_lavis_s": times["lavis"], "step_time_lavis_s": median(times["lavis"]),
        "speedup_vs_lavis": median(times["lavis"]) / step_time,
        "step_cpu_s": {name: median(c) for name, c in cpu.items()},
        "speedup_vs_lavis_cpu": median(cpu["lavis"]) / median(cpu["ours"]),
        "speedup_itm_kv_reuse_cpu": median(cpu["recompute_itm_kv"]) / median(cpu["ours"]),
        "same_weights_losses": same_weights,
        "flops_ratio_itm_kv_reuse": flops_recompute / flops["total"],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    path = write_result("step", payload, args.out_dir)
    print(
        f"step: {samples_per_s:.2f} samples/s (batch {batch}, {step_time * 1e3:.0f} ms/step, {device} {payload['dtype']}), "
        f"peak mem {peak_mem / 2**20:.0f} MiB, {flops['total'] / 1e9:.2f} GFLOP/sample, "
        f"{achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.1%} of measured matmul peak {peak / 1e9:.1f} GFLOP/s; "
        f"ITM K/V reuse {payload['speedup_itm_kv_reuse']:.2f}x vs recomputing "
        f"({payload['flops_ratio_itm_kv_reuse']:.2f}x fewer FLOPs); {payload['speedup_vs_lavis']:.2f}x the step computed "
        f"LAVIS's way ({payload['speedup_vs_lavis_cpu']:.2f}x in CPU time; {payload['step_time_lavis_s'] * 1e3:.0f} ms: "
        f"{length} text columns, not "
        f"{payload['text_width']}; K/V recomputed; dense word-embedding gradients; torch's default AdamW, "
        f"not {payload['optimizer_kernel']}); same-weights "
        f"losses differ by {same_weights['max_abs_difference']:.1e} -> {path}"
    )
    return payload


def _losses_alike(model, forward, names: list[str]) -> dict:
    """Every path's four losses on the same weights, in eval mode (no dropout) with the ITM negatives seeded
    alike: what differs between the paths is the work, not the maths."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    model.eval()
    out = {}
    with torch.no_grad():
        for name in names:
            torch.manual_seed(0)
            result = forward(name)
            out[name] = {k: float(getattr(result, k)) for k in ("loss", "loss_itc", "loss_itm", "loss_lm")}
    model.train()
    worst = max(abs(out[n][k] - out[names[0]][k]) for n in names for k in out[n])
    return {"losses": out, "max_abs_difference": worst}


def _kernel(optimizer) -> str:
    group = optimizer.param_groups[0]
    return "fused" if group.get("fused") else "foreach" if group.get("foreach") else "per-tensor loop"


def _sync(device: str) -> None:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
