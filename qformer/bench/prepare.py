"""`qformer bench prepare`: `data prepare`'s images/s per core against img2dataset's multiprocessing distributor.

The same URL list both ways: `--images` generated JPEGs (synthetic shapes, `--size` px) served by an HTTP
server on loopback inside this process, so the network is not what is measured. Ours: the `ray` engine on
a local Ray with one CPU (shards run one after another on one core: the rate is per core). The baseline:
img2dataset's own multiprocessing distributor with one process (`processes_count=1`), the same shard
size, thread count and timeout, no resize, run with `--img2dataset-python` (a Python where img2dataset
is installed: it pins pandas<3, so it may live in its own venv); without one, a plain single-process
loop (fetch, decode, write a file per image) stands in, and the result says which baseline ran.
Each side runs `--repeats` times into a fresh folder; rates are medians; the ratio is ours / baseline.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=256, help="side of the served JPEGs")
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--img2dataset-python", default=os.environ.get("IMG2DATASET_PYTHON"),
                        help="a python that can import img2dataset (default: $IMG2DATASET_PYTHON)")
    parser.add_argument("--out-dir", default=None, help="where the result JSON goes (default: experiments/benchmarks/results)")


def _serve(images: list[bytes]):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            body = images[int(self.path.rsplit("/", 1)[1].split(".")[0])]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        request_queue_size, daemon_threads = 256, True

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _images(n: int, size: int) -> tuple[list[bytes], list[str]]:
    import numpy as np

    from qformer.data.synth import captions, render, sample_scene

    rng = np.random.default_rng(0)
    out, caps = [], []
    for _ in range(n):
        scene = sample_scene(rng)
        buf = io.BytesIO()
        render(scene, size, rng).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
        caps.append(captions(scene, 1, rng)[0])
    return out, caps


_I2D = """
import sys, time
from img2dataset import download
t = time.perf_counter()
download(url_list=sys.argv[1], output_folder=sys.argv[2], output_format="webdataset", input_format="tsv",
         url_col="url", caption_col="caption", number_sample_per_shard=int(sys.argv[3]), thread_count=int(sys.argv[4]),
         processes_count=1, distributor="multiprocessing", resize_mode="no", timeout=10, enable_wandb=False)
print("SECONDS", time.perf_counter() - t)
"""


def _plain_loop(urls: list[str], out: Path) -> None:
    import urllib.request

    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for i, url in enumerate(urls):
        with urllib.request.urlopen(url, timeout=10) as resp:
            data = resp.read()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        (out / f"{i:09d}.jpg").write_bytes(data)


def run(args: argparse.Namespace) -> dict:
    import ray

    from qformer.bench.common import write_result
    from qformer.jobs.prepare_job import prepare

    images, caps = _images(args.images, args.size)
    server = _serve(images)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    urls = [f"{base}/img/{i}.jpg" for i in range(args.images)]
    (work / "urls.tsv").write_text("url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in zip(urls, caps)))
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    ours, baseline, kind = [], [], "img2dataset multiprocessing (1 process)" if args.img2dataset_python else \
        "plain single-process loop (img2dataset not available: pass --img2dataset-python)"
    try:
        for r in range(args.repeats):
            t = time.perf_counter()
            result = prepare(str(work / "urls.tsv"), str(work / f"ours{r}"), "wds", shard_size=args.shard_size,
                             threads=args.threads)
            ours.append(result.stats["successes"] / (time.perf_counter() - t))
            if args.img2dataset_python:
                proc = subprocess.run([args.img2dataset_python, "-c", _I2D, str(work / "urls.tsv"), str(work / f"i2d{r}"),
                                       str(args.shard_size), str(args.threads)], capture_output=True, text=True,
                                      env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
                seconds = float(proc.stdout.rsplit("SECONDS", 1)[1]) if "SECONDS" in proc.stdout else None
                if seconds is None:
                    raise RuntimeError(f"img2dataset failed: {proc.stderr[-2000:]}")
                done = sum(json.loads(p.read_text())["successes"] for p in (work / f"i2d{r}").glob("*_stats.json"))
                baseline.append(done / seconds)
            else:
                t = time.perf_counter()
                _plain_loop(urls, work / f"plain{r}")
                baseline.append(args.images / (time.perf_counter() - t))
    finally:
        server.shutdown()
        if started_here:
            ray.shutdown()
    payload = {"images": args.images, "image_px": args.size, "shard_size": args.shard_size, "threads": args.threads,
               "ours_images_per_s_per_core": statistics.median(ours), "baseline": kind,
               "baseline_images_per_s_per_core": statistics.median(baseline),
               "ratio": statistics.median(ours) / statistics.median(baseline), "ours_runs": ours,
               "baseline_runs": baseline}
    path = write_result("prepare", payload, args.out_dir)
    print(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return payload
