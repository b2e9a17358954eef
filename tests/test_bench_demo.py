"""`qformer bench demo`'s measuring parts: the process-tree sampler on real processes, the phase clock on lines."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from qformer.bench.demo import MiB, TreeSampler, descendants, phase_times, process_label

_PARENT = """
import subprocess, sys, time
held = bytearray(120 * 2**20)  # touched: resident
child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(60 * 2**20); open(sys.argv[1], 'w').close(); time.sleep(60)".replace("sys.argv[1]", repr(sys.argv[1]))])
time.sleep(60)
"""


def test_the_sampler_sums_a_process_tree_and_keeps_each_process_s_peak(tmp_path: Path):
    ready = tmp_path / "child-ready"
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(ready)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.1)
        tree = descendants(parent.pid)
        assert len(tree) == 2 and tree[0] == parent.pid  # the parent and its child, nothing else
        sampler = TreeSampler(parent.pid, interval_s=0.1)
        sampler.sample()
        peak = sampler.peak
        assert len(sampler.totals) == 1 and sampler.totals[0][1] == peak["pss"]
        assert peak["processes"] == 2
        # 120 + 60 MiB allocated, plus two interpreters; shared pages (libpython) counted once in PSS
        assert 180 * MiB < peak["pss"] < peak["rss"]
        assert process_label(parent.pid) == "python -c"
        assert 120 * MiB < sampler.label_peaks["python -c"] < peak["pss"]  # one process's peak, not the sum
    finally:
        for pid in descendants(parent.pid)[::-1]:
            subprocess.run(["kill", str(pid)], check=False)
        parent.wait(timeout=30)


def test_a_process_whose_name_went_blank_as_it_exits_keeps_the_name_it_had(tmp_path: Path, monkeypatch):
    """The demo's own process, exiting, read as "" (its cmdline empty, its memory still mapped) and became a
    separate row of the per-process peaks."""
    import qformer.bench.demo as bench_demo

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sampler = TreeSampler(proc.pid, interval_s=0.1)
        sampler.sample()
        monkeypatch.setattr(bench_demo, "process_label", lambda pid: "")
        sampler.sample()
        assert set(sampler.label_peaks) == {"python -c"} and set(sampler.peak["by_label"]) == {"python -c"}
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_phases_are_timed_from_the_demo_s_own_lines():
    lines = [(2.0, "writing the synthetic shapes data set to /x ..."),
             (14.0, "connecting to Ray ..."),
             (20.0, "training; the run first evaluates the untrained model on 'test' ..."),
             (21.0, "Ray Train run 'demo_tiny_shapes' in /x/ray_results"),
             (30.0, "(RayTrainWorker pid=1) 02:49:49 [qformer rank 0] INFO rank 0/1 on cpu, AMP bf16 autocast"),
             (40.0, "(RayTrainWorker pid=1) INFO eval test at step 0: ITM re-rank: 6304/11467 pairs (55%), 0:00:25 left"),
             (71.0, "(RayTrainWorker pid=1) INFO eval test at step 0: ITM re-rank: 11467/11467 pairs (100%), done in 0:00:41"),
             (150.0, "(RayTrainWorker pid=1) epoch 0 iter 50/50 step 50 | loss 5.1 (itc 3.4 itm 0.6 lm 1.1)"),
             (245.0, "(RayTrainWorker pid=1) epoch 1 iter 50/50 step 100 | loss 4.1 (itc 2.4 itm 0.6 lm 1.1)"),
             (250.0, "(RayTrainWorker pid=1) INFO eval test at step 100: ITM re-rank: 11467/11467 pairs (100%), done in 0:00:40"),
             (290.0, "=== qformer demo ===")]
    assert phase_times(lines, wall=293.0) == {"write data": 14.0, "Ray start": 7.0, "worker start": 9.0,
                                              "untrained evaluation": 41.0, "training": 174.0,
                                              "final evaluation": 45.0, "summary and exit": 3.0}
    # a phase whose line never came (no untrained evaluation): its time goes to the next phase found
    without = [line for line in lines if not 30.0 < line[0] < 100.0]
    assert phase_times(without, wall=293.0)["training"] == 215.0 and "untrained evaluation" not in phase_times(
        without, wall=293.0)
