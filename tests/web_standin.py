"""A web URL list behind the loopback HTTP server (tests/http_stub.py), as `qformer data prepare` meets one:
good images (synthetic shapes, their captions), 404s and 500s, HTML where an image should be, a server too
slow for the timeout, rows with no or a non-http URL, and a line with too many fields."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qformer.data.synth import captions, render, sample_scene


@dataclass
class WebList:
    path: Path
    good: int  # rows that should become pairs
    rows: int  # rows the list holds (the unreadable line not counted)
    failed_to_download: int
    not_images: int


def serve_web_list(server, folder: Path, good: int = 40, seed: int = 0, slow_s: float = 0.0) -> WebList:
    rng = np.random.default_rng(seed)
    lines = ["url\tcaption"]
    for i in range(good):
        scene = sample_scene(rng)
        buf = io.BytesIO()
        render(scene, 64, rng).save(buf, format="PNG" if i % 10 == 0 else "JPEG")  # PNGs are re-encoded
        lines.append(f"{server.add(f'/img/{i}.jpg', buf.getvalue(), content_type='image/jpeg')}\t"
                     f"{captions(scene, 1, rng)[0]}")
    failed = []
    for i in range(3):
        failed.append(server.add(f"/missing/{i}.jpg", status=404))
    failed.append(server.add("/broken.jpg", status=500))
    if slow_s:
        failed.append(server.add("/slow.jpg", b"\xff\xd8late", delay_s=slow_s))
    failed += ["", "ftp://example.invalid/a.jpg"]  # bad rows: no URL, not http(s)
    html = [server.add(f"/page/{i}.jpg", b"<html>not an image</html>", content_type="text/html") for i in range(2)]
    lines += [f"{u}\ta picture that is not there" for u in failed + html]
    lines.insert(5, "http://127.0.0.1:9/x.jpg\ttoo\tmany fields")  # unreadable: skipped and counted
    path = folder / "urls.tsv"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return WebList(path, good, good + len(failed) + len(html), len(failed), len(html))
