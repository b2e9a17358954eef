"""A real browser for the MLflow UI: `qformer ui` started as a user would, pages rendered by headless chromium.

Chromium comes from Debian (platform/ci/ensure_chromium.sh, which `make test` runs); a test that needs it
fails, naming the script, where it is missing.
"""
from __future__ import annotations

import contextlib
import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "no chromium on PATH: run platform/ci/ensure_chromium.sh (make test does)"
    return found


def page_text(url: str, expect: tuple[str, ...] = (), tries: int = 4, wait_ms: int = 20000) -> str:
    """The visible text of the page after its scripts ran (`--virtual-time-budget` lets the single-page app
    fetch and render before the DOM is dumped), tags dropped, whitespace collapsed. Loaded again (up to
    `tries` times) while a string of `expect` is missing: on a busy machine the server's first answers can
    come after the budget, and the page would be dumped still loading."""
    for _ in range(tries):
        proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
                               f"--virtual-time-budget={wait_ms}", "--dump-dom", url],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", proc.stdout, flags=re.S)
        text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text))).strip()
        if all(part in text for part in expect):
            break
    return text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_ui(uri: str, home: Path, timeout_s: float = 120.0) -> Iterator[tuple[subprocess.Popen, int, list[str]]]:
    """`qformer ui --tracking-uri uri` until its "latest run:" line; yields (process, port, lines so far).
    Leaving the block stops it with Ctrl-C as a user would (its server, in its own process group, goes too)."""
    port = free_port()
    env = {**os.environ, "QFORMER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qformer.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + timeout_s
        while not any(line.startswith(("latest run:", "no run yet")) for line in lines):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            lines.append(line)
            assert time.monotonic() < deadline, "".join(lines)
        yield proc, port, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
