"""The demo's memory and time: peak memory of its whole process tree and how long each phase takes.

Runs `qformer demo --fresh` as a user would (a subprocess, in a temporary QFORMER_HOME unless --home), and
every --interval-s reads each process under it (the demo, Ray's GCS, raylet and workers, the Train
controller and worker, Ray Data's tasks) from /proc/<pid>/smaps_rollup. Memory is PSS: a page shared by
n processes counts 1/n in each, so the tree's sum counts shared pages once (RSS would count torch's
libraries once per process). Reported: the tree's peak, each kind of process's own peak, and the phases
timed from the demo's own progress lines (data written, Ray started, untrained evaluation, training,
final evaluation).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from qformer.bench.common import write_result

MiB = 1024 * 1024
# phase -> (the demo's line that ends it, as a regex; "first" or "last" such line); the next phase starts there
PHASE_ENDS = (("write data", r"^connecting to Ray", "first"),        # the data set written when missing
              ("Ray start", r"^Ray Train run '", "first"),
              ("worker start", r"rank 0/\d+ on ", "first"),           # Train worker up, model built
              ("untrained evaluation", r"eval \S+ at step 0: ITM re-rank: .*done in", "first"),
              ("training", r" step \d+ \| loss ", "last"),            # the worker's last step line
              ("final evaluation", r"^=== qformer demo ===", "first"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", default=None, help="QFORMER_HOME for the run (default: a new temporary one, "
                                                     "so the data set is written too)")
    parser.add_argument("--options", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--interval-s", type=float, default=0.5, help="seconds between samples of the tree")
    parser.add_argument("--out-dir", default=None, help="results directory (default experiments/benchmarks/results)")


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="qformer-bench-demo-") as tmp:
        home = Path(args.home or tmp)
        payload = measure_demo(home, list(args.options), args.interval_s)
    path = write_result("demo", payload, args.out_dir)
    print(f"demo: peak {payload['peak_pss_mib']:.0f} MiB PSS over {payload['peak_processes']} processes "
          f"(RSS sum at that moment {payload['rss_at_peak_mib']:.0f} MiB), {payload['wall_s']:.0f} s -> {path}")
    for name, secs in payload["phases_s"].items():
        print(f"  {name:22s} {secs:7.1f} s")
    for label, peak in payload["per_process_peak_mib"].items():
        print(f"  {label:40s} {peak:7.0f} MiB")
    return payload


def measure_demo(home: Path, options: list[str], interval_s: float) -> dict:
    """Run the demo with a sampler on its process tree; the figures as run() reports them."""
    env = {**os.environ, "QFORMER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "qformer.cli", "demo", "--fresh"]
    if options:
        command += ["--options", *options]
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    sampler = TreeSampler(proc.pid, interval_s)
    sampler.start()
    lines: list[tuple[float, str]] = []
    for line in proc.stdout:
        lines.append((time.monotonic() - start, line.rstrip("\n")))
    code = proc.wait()
    wall = time.monotonic() - start
    sampler.stop()
    if code != 0:
        tail = "\n".join(text for _, text in lines[-30:])
        raise RuntimeError(f"qformer demo exited {code}; its last lines:\n{tail}")
    peak = sampler.peak
    return {"options": options, "wall_s": wall, "exit_code": code,
            "phases_s": phase_times(lines, wall),
            "peak_pss_mib": peak["pss"] / MiB, "rss_at_peak_mib": peak["rss"] / MiB,
            "peak_processes": peak["processes"], "peak_at_s": peak["t"],
            "per_process_at_peak_mib": {k: v / MiB for k, v in sorted(peak["by_label"].items(),
                                                                       key=lambda kv: -kv[1])},
            "per_process_peak_mib": {k: v / MiB for k, v in sorted(sampler.label_peaks.items(),
                                                                   key=lambda kv: -kv[1])},
            "samples": len(sampler.totals), "interval_s": interval_s,
            "timeline_mib": [(round(t, 1), round(v / MiB)) for t, v in sampler.totals[::max(1, int(5 / interval_s))]],
            "recall": _recalls(lines), "lines": [(round(t, 1), text) for t, text in lines]}


def phase_times(lines: list[tuple[float, str]], wall: float) -> dict[str, float]:
    """Seconds per phase, each ending at its marker line (the first or the last one, after the previous phase);
    a phase whose marker never came (e.g. no untrained evaluation on a re-run) is left out, and its time goes
    to the next phase found."""
    phases: dict[str, float] = {}
    last = 0.0
    for name, pattern, which in PHASE_ENDS:
        hits = [t for t, text in lines if t >= last and re.search(pattern, text)]
        if hits:
            at = hits[0] if which == "first" else hits[-1]
            phases[name], last = at - last, at
    phases["summary and exit"] = wall - last
    return phases


def _recalls(lines: list[tuple[float, str]]) -> dict[str, list[float]]:
    """The demo's printed before -> after table."""
    table = {}
    for _, text in lines:
        m = re.match(r"\s+(\w+)\s+([\d.]+) ->\s+([\d.]+)$", text)
        if m:
            table[m.group(1)] = [float(m.group(2)), float(m.group(3))]
    return table


class TreeSampler:
    """Samples PSS and RSS of a process and all its descendants (found through /proc's parent links, so Ray's
    daemons and workers, started under the demo, are included) on a thread."""

    def __init__(self, root_pid: int, interval_s: float) -> None:
        self.root_pid, self.interval_s = root_pid, interval_s
        self.totals: list[tuple[float, int]] = []  # (seconds since start, the tree's PSS)
        self.label_peaks: dict[str, int] = {}
        self._labels: dict[int, str] = {}  # each pid's last readable label
        self.peak = {"pss": 0, "rss": 0, "processes": 0, "t": 0.0, "by_label": {}}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        pss = rss = 0
        by_label: dict[str, int] = {}
        pids = descendants(self.root_pid)
        for pid in pids:
            mem = smaps_rollup(pid)
            if mem is None:
                continue
            # an exiting process still has its memory for a moment after its cmdline reads empty: keep its name
            label = process_label(pid)
            label = self._labels[pid] = label if label not in ("", "?") else self._labels.get(pid, label)
            pss, rss = pss + mem["Pss"], rss + mem["Rss"]
            by_label[label] = by_label.get(label, 0) + mem["Pss"]
            self.label_peaks[label] = max(self.label_peaks.get(label, 0), mem["Pss"])
        self.totals.append((time.monotonic() - self._t0, pss))
        if pss > self.peak["pss"]:
            self.peak = {"pss": pss, "rss": rss, "processes": len(pids), "t": time.monotonic() - self._t0,
                         "by_label": by_label}


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name field may hold spaces and parentheses
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def smaps_rollup(pid: int) -> dict[str, int] | None:
    """Rss and Pss of a process in bytes (None: it has gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    out = {}
    for key in ("Rss", "Pss"):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        out[key] = int(m.group(1)) * 1024 if m else 0
    return out


def process_label(pid: int) -> str:
    """What a process is: Ray's own name for a worker (`ray::RayTrainWorker`, `ray::IDLE`, a Data task's
    operators), the program for the rest (raylet, gcs_server, `python -m qformer.cli`, ...)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split(".")[0].split(" ")[0]
    words = [w.decode(errors="replace") for w in argv if w]
    name = os.path.basename(first)
    if name.startswith("python") and len(words) > 1:
        rest = words[1:3] if words[1] == "-m" else words[1:2]
        return "python " + " ".join(os.path.basename(w) for w in rest)
    return name
