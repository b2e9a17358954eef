"""fp16 autocast + GradScaler on CPU through the real train step and the real (small) Blip2Qformer with an
fp16 EVA ViT: which runs convert the ViT, an overflow skips the step and halves the scale, the scale grows
after its interval, the scaler's state round-trips a checkpoint, and the losses track an fp32 run."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from helpers import small_model_cfg
from qformer.models import build_model
from qformer.train import checkpoint as ckpt_io
from qformer.train.amp import amp_for_run, resolve_amp
from qformer.train.lr_schedule import build_lr_scheduler
from qformer.train.optim import build_optimizer
from qformer.train.step import TrainState, prepare_samples, train_step, with_text_plan

CPU = torch.device("cpu")
EVA = {"vit_model": "eva_clip_g", "vit_precision": "fp16",
       "vit_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}}
RUN = {"init_lr": 1e-4, "min_lr": 1e-5, "warmup_lr": -1, "warmup_steps": 0, "max_epoch": 1,
       "lr_sched": "constant_lr", "weight_decay": 0.05, "beta2": 0.999, "lr_layer_decay": 1.0}


def _model(bert: str, fp16: bool):
    torch.manual_seed(0)
    return build_model(small_model_cfg(bert, **EVA), vit_fp16_on_cpu=fp16).eval()  # eval: no dropout to differ


def _state(model, amp, kernel: str = "chosen") -> TrainState:
    """`kernel`: "chosen" is build_optimizer's (fused on CPU and CUDA); "foreach" is torch's CUDA default, which
    a GradScaler skips on the host (one read of its overflow flag per step)."""
    run = OmegaConf.create(RUN)
    optimizer = build_optimizer(model, run)
    if kernel == "foreach":
        optimizer = torch.optim.AdamW(model.get_optimizer_params(RUN["weight_decay"]), lr=RUN["init_lr"],
                                      betas=(0.9, RUN["beta2"]), eps=1e-8, foreach=True)
    assert bool(optimizer.param_groups[0].get("fused")) == (kernel == "chosen")
    return TrainState(model=model, optimizer=optimizer, scheduler=build_lr_scheduler(optimizer, run), amp=amp,
                      device=CPU, scaler=amp.make_scaler())


def _batch(model, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids, atts = model.tokenize(["a red circle", "a small blue square", "green triangle on the left", "a big star"])
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    return with_text_plan({"image": images, "text_ids": ids, "text_atts": atts}, model)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_vit_is_fp16_on_cpu_only_when_the_run_autocasts_in_fp16(tiny_bert):
    fp16_run = OmegaConf.create({"amp": True, "amp_dtype": "fp16"})
    assert amp_for_run(fp16_run, CPU).vit_fp16_on_cpu
    assert not amp_for_run(OmegaConf.create({"amp": True, "amp_dtype": "auto"}), CPU).vit_fp16_on_cpu  # bf16
    assert not amp_for_run(OmegaConf.create({"amp": False, "amp_dtype": "fp16"}), CPU).vit_fp16_on_cpu
    half, full = _model(tiny_bert, fp16=True), _model(tiny_bert, fp16=False)
    assert half.vit_fp16 and half.visual_encoder.blocks[0].mlp.fc1.weight.dtype == torch.float16
    assert half.visual_encoder.pos_embed.dtype == torch.float32 and half.ln_vision.weight.dtype == torch.float32
    assert not full.vit_fp16 and full.visual_encoder.blocks[0].mlp.fc1.weight.dtype == torch.float32


def test_fp16_steps_track_the_fp32_losses(tiny_bert):
    """Same weights and batches, fp16 ViT + fp16 autocast + GradScaler against fp32 throughout: four steps'
    losses agree to 0.1% (measured: under 0.005%), and both runs train (the weights move). The loss scale starts
    at 2^10: at the default 2^16 this batch of 4 overflows in the first step (the ITC logits' gradient is
    scale x (p - y) / batch / temp in fp16), which is skipped, and the fp16 run trails by one step."""
    runs = {}
    for name, fp16 in (("fp32", False), ("fp16", True)):
        model = _model(tiny_bert, fp16)
        amp = resolve_amp(fp16, "fp16", CPU, init_scale=2.0**10)
        state = _state(model, amp)
        before = _trainable(model)
        losses = []
        for i in range(4):
            torch.manual_seed(100 + i)  # same ITM negatives draw in both runs
            losses.append(train_step(state, _batch(model, i), epoch=0, iter_in_epoch=i).losses)
        assert not torch.equal(before["query_tokens"], model.query_tokens.detach())
        runs[name] = losses
        assert state.skipped_overflow == 0
    assert runs["fp16"][0]["loss"].dtype == torch.float32
    for step, (a, b) in enumerate(zip(runs["fp32"], runs["fp16"])):
        for key in ("loss_itc", "loss_itm", "loss_lm"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-3), (step, key)


@pytest.mark.parametrize("kernel", ["chosen", "foreach"])
def test_an_overflow_skips_the_step_halves_the_scale_and_the_scale_grows_back(tiny_bert, kernel):
    """Either kernel: the fused one (skipped on the device, counted when the count is read) and foreach
    (skipped by the scaler on the host)."""
    model = _model(tiny_bert, fp16=True)
    state = _state(model, resolve_amp(True, "fp16", CPU, init_scale=2.0**10, growth_interval=2), kernel)
    assert state.scaler.get_scale() == 2.0**10
    train_step(state, _batch(model, 0), 0, 0)
    good = _trainable(model)
    adam_steps = {n: float(s["step"]) for n, s in zip(good, state.optimizer.state.values())}

    poison = model.query_tokens.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    out = train_step(state, _batch(model, 1), 0, 1)
    poison.remove()
    # the host knows of a fused kernel's skip only through the count (read from the device when asked)
    assert out.optimizer_stepped == (kernel == "chosen")
    assert state.skipped_overflow == 1 and state.optimizer_steps == 1
    assert state.scaler.get_scale() == 2.0**9  # backoff 0.5
    for name, value in _trainable(model).items():
        assert torch.equal(value, good[name]), name  # no parameter moved, not even the un-poisoned ones
    assert {n: float(s["step"]) for n, s in zip(good, state.optimizer.state.values())} == adam_steps

    stepped = [train_step(state, _batch(model, 2 + k), 0, 2 + k).optimizer_stepped for k in range(2)]
    assert stepped == [True, True] and state.skipped_overflow == 1
    assert state.scaler.get_scale() == 2.0**10  # doubled after growth_interval (2) good steps
    assert torch.isfinite(model.query_tokens).all()

    saved = ckpt_io.build_state(model, state.optimizer, state.scheduler, state.scaler, {}, epoch=0, step=4,
                                iters_in_epoch=4, epoch_complete=False, mlflow_run_id=None)
    fresh = resolve_amp(True, "fp16", CPU, init_scale=2.0**10, growth_interval=2).make_scaler()
    fresh.load_state_dict(saved["scaler"])
    assert fresh.state_dict() == state.scaler.state_dict()


def test_an_fp16_vit_without_autocast_feeds_the_q_former_fp32(tiny_bert):
    """run.amp: false with vit_precision: fp16. CLIP's stream is fp16 (as LAVIS's), so without the step's
    autocast its tokens would reach the fp32 Q-Former's first Linear as fp16 ("mat1 and mat2 must have the
    same dtype"); they are cast to fp32 as LAVIS's `.float()` does, in training and in evaluation."""
    torch.manual_seed(0)
    cfg = small_model_cfg(tiny_bert, vit_model="clip_L", vit_precision="fp16")
    cfg.vit_kwargs = {"width": 32, "layers": 2, "heads": 2, "patch_size": 8}
    model = build_model(cfg, vit_fp16_on_cpu=True).eval()
    assert model.visual_encoder.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.float16
    batch = prepare_samples(_batch(model, 0), CPU)
    assert model.vit_features(batch["image"]).dtype == torch.float16  # the ViT itself ran under fp16 autocast
    out = model(batch)  # no autocast around the step
    assert torch.isfinite(out.loss)
    out.loss.backward()
    feats, embeds = model.encode_image(image=batch["image"])
    assert embeds.dtype == feats.dtype == torch.float32
    logits = model.itm_logit(embeds, batch["text_ids"], batch["text_atts"])
    assert logits.shape == (4,) and torch.isfinite(logits).all()


def test_an_fp16_vit_inside_a_bf16_step_runs_in_fp16(tiny_bert):
    """Under bf16 autocast the fp16 ViT's matmuls stay fp16: autocast would otherwise re-cast every fp16
    weight to bf16 on each step (time, and bf16's 8-bit mantissa on the frozen features)."""
    model = _model(tiny_bert, fp16=True)
    seen = []
    model.visual_encoder.blocks[0].mlp.fc1.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(prepare_samples(_batch(model, 0), CPU))
    assert seen == [torch.float16] and torch.isfinite(out.loss)


@pytest.mark.parametrize("kernel", ["chosen", "foreach"])
def test_an_fp16_step_reads_nothing_back_with_the_fused_kernel(tiny_bert, kernel, monkeypatch):
    """The whole train step (forward, scaled backward, unscale and inf check, optimiser step, scale update)
    records no op that would make the host wait for a GPU when the fused kernel takes the scaler's overflow
    flag; with foreach the scaler reads the flag back once a step. The skip count is read only when asked."""
    from qformer.train import step as step_module
    from qformer.train.sync_check import no_device_sync

    model = _model(tiny_bert, fp16=True)
    state = _state(model, resolve_amp(True, "fp16", CPU, init_scale=2.0**10), kernel)
    batches = [_batch(model, i) for i in range(3)]  # text plans made here, on the host's token batch
    train_step(state, batches[0], 0, 0)  # the first: optimiser state and CLIP's mean/std tables made
    # the step would plan the (CPU) token batch again: host work that a GPU never waits for
    monkeypatch.setattr(step_module, "with_text_plan", lambda batch, model: batch)
    with no_device_sync(CPU) as seen:
        for i in (1, 2):
            train_step(state, batches[i], 0, i)
    if kernel == "chosen":
        assert seen == [], seen
    else:  # the scaler's flag; (on this CPU also foreach's step counters, which on a GPU live in host memory)
        assert "aten._local_scalar_dense.default" in seen, seen
    assert state.optimizer_steps == 3 and state.skipped_overflow == 0
