"""A real browser for the MLflow UI: `qformer ui` started as a user would, pages rendered by headless chromium.

Chromium comes from Debian (platform/ci/ensure_chromium.sh, which `make test` runs); a test that needs it
fails, naming the script, where it is missing.
"""
from __future__ import annotations

import asyncio
import contextlib
import html
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from helpers import free_port


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "no chromium on PATH: run platform/ci/ensure_chromium.sh (make test does)"
    return found


def page_text(url: str, expect: tuple[str, ...] = (), timeout_s: float = 90.0) -> str:
    """The text of the page as rendered by headless chromium: script and style dropped, tags dropped, whitespace
    collapsed. The page is read live over the DevTools protocol every half second until every string of
    `expect` shows (or `timeout_s` passes; the last text is returned for the caller's assertion to print).
    A single DOM dump after a fixed budget was flaky: MLflow's charts draw after their metric histories
    arrive, which on a busy machine came after the dump about half the time."""
    return asyncio.run(_page_text(url, expect, timeout_s))


async def _page_text(url: str, expect: tuple[str, ...], timeout_s: float) -> str:
    import aiohttp  # ray[default]'s dependency; its websocket client speaks the DevTools protocol

    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
                                 "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            endpoint = _devtools_endpoint(proc)
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://{endpoint}/json/list") as answer:
                    page = next(t for t in await answer.json() if t["type"] == "page")
                async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    calls = iter(range(1, 1 << 30))

                    async def call(method: str, **params):
                        ident = next(calls)
                        await ws.send_json({"id": ident, "method": method, "params": params})
                        while True:
                            message = await ws.receive_json()
                            if message.get("id") == ident:
                                assert "error" not in message, message
                                return message["result"]

                    await call("Page.navigate", url=url)
                    deadline = time.monotonic() + timeout_s
                    text = ""
                    while True:
                        result = await call("Runtime.evaluate", returnByValue=True,
                                            expression="document.documentElement.outerHTML")
                        text = _visible_text(result["result"].get("value", ""))
                        if all(part in text for part in expect) or time.monotonic() > deadline:
                            return text
                        await asyncio.sleep(0.5)
        finally:  # its renderer and zygote processes too, before the profile is removed
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _devtools_endpoint(proc: subprocess.Popen) -> str:
    """host:port from chromium's "DevTools listening on ws://host:port/..." line on stderr."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        found = re.search(r"DevTools listening on ws://([^/]+)/", line)
        if found:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining: a full pipe blocks it
            return found.group(1)
    raise AssertionError(f"chromium exited before its DevTools endpoint: {''.join(seen)[-2000:]}")


def _visible_text(page_html: str) -> str:
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", page_html, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text))).strip()


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
