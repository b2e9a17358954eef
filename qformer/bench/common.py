"""Shared benchmark plumbing: machine info, result files, the matmul-peak baseline."""
from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "results"


def machine_info() -> dict:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_result(name: str, payload: dict, out_dir: str | Path | None = None) -> Path:
    """Write `<name>-<UTC timestamp>.json` and `<name>-latest.json`; returns the timestamped path."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    record = {"benchmark": name, "when": stamp, "machine": machine_info(), **payload}
    text = json.dumps(record, indent=2, sort_keys=True, default=str)
    path = out / f"{name}-{stamp}.json"
    path.write_text(text)
    (out / f"{name}-latest.json").write_text(text)
    return path


def train_state(model, run_cfg, amp):
    """The training loop's per-worker state for a bench: LAVIS's AdamW and LR schedule from `run_cfg`
    (anything with .get and attributes), the AMP policy's GradScaler when it wants one."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.train.lr_schedule import build_lr_scheduler
    from qformer.train.optim import build_optimizer
    from qformer.train.step import TrainState

    optimizer = build_optimizer(model, run_cfg)
    return TrainState(model=model, optimizer=optimizer, scheduler=build_lr_scheduler(optimizer, run_cfg), amp=amp,
                      device=model.device, scaler=amp.make_scaler())


def measure_matmul_peak(device: str = "cpu", size: int = 1024, dtype=None, seconds: float = 1.0) -> float:
    """Achievable dense-matmul FLOP/s on this device (the baseline that step FLOP/s is compared with)."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    _sync(device)
    elapsed = time.perf_counter() - start
    return 2 * size**3 * n / elapsed


def _sync(device: str) -> None:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
