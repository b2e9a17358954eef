"""Resumable, verified HTTP downloads: what `qformer data download` and `qformer weights fetch` share.

One file at a time (`fetch`), or many in parallel with one progress line (`fetch_all`). The rules:
- A file is written to `<dest>.part` and renamed to `<dest>` only once it is complete and verified, so
  a file under its final name is always whole; a re-run skips it and resumes every `.part` from where it
  stopped with an HTTP Range request (a server that ignores the range sends the whole file: start over).
- Verified: the byte count against what the server declared (Content-Length / Content-Range total) and
  the size published for it, and its MD5 against the published one, else the one Google Cloud Storage
  sends in `x-goog-hash` (where LAVIS's files live). A mismatch deletes the part and fails, naming both.
- A dropped connection, a timeout, a 5xx or a 429 is retried (with the part kept, so the retry resumes);
  a 4xx fails at once; a full disk stops with what was kept (a re-run resumes).
- A mirror base URL can replace each host: `--mirror URL` (all hosts) or `--mirror HOST=URL`.
Standard library only: nodes with no extra packages can run it.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import http.client
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

USER_AGENT = "qformer-platform (+https://github.com/salesforce/LAVIS layouts)"
_CHUNK = 1 << 20
_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class FetchError(Exception):
    """A file could not be fetched or verified; the message names the URL and what to do."""


@dataclass(frozen=True)
class RemoteFile:
    url: str
    dest: Path
    size: int | None = None  # published size in bytes, when the publisher gives one
    md5: str | None = None  # published MD5 (hex), when the publisher gives one


@dataclass
class Fetched:
    file: RemoteFile
    bytes: int  # size of the whole file
    downloaded: int  # bytes transferred by this run (0: it was already there)
    resumed_from: int = 0  # bytes of a previous run's part that were kept
    md5_checked: str | None = None  # "published" / "server" / None: which MD5 it was checked against


def parse_mirrors(values: list[str] | None) -> dict[str, str]:
    """`--mirror` values -> {host or "*": base URL}."""
    out: dict[str, str] = {}
    for value in values or []:
        host, sep, base = value.partition("=")
        if sep and "://" not in host:
            out[host] = base.rstrip("/")
        else:
            out["*"] = value.rstrip("/")
    return out


def mirrored(url: str, mirrors: dict[str, str] | None) -> str:
    """`url` with its scheme and host replaced by the mirror for that host (else the "*" one), path kept."""
    if not mirrors:
        return url
    parts = urllib.parse.urlsplit(url)
    base = mirrors.get(parts.netloc) or mirrors.get("*")
    if not base:
        return url
    return base + parts.path + (f"?{parts.query}" if parts.query else "")


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _goog_md5(headers) -> str | None:
    """The MD5 in Google Cloud Storage's `x-goog-hash: crc32c=...,md5=<base64>` header, as hex."""
    for value in headers.get_all("x-goog-hash") or []:
        for item in value.split(","):
            key, _, b64 = item.strip().partition("=")
            if key == "md5" and b64:
                try:
                    return base64.b64decode(b64).hex()
                except ValueError:
                    return None
    return None


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _total(resp, start: int) -> tuple[int, int | None]:
    """(offset the body starts at, whole-file size or None) from a 200 or 206 answer."""
    if resp.status == 206:
        match = _RANGE.match(resp.headers.get("Content-Range", ""))
        if not match:
            return 0, None  # a range answer we cannot place: start over
        return int(match.group(1)), (None if match.group(3) == "*" else int(match.group(3)))
    length = resp.headers.get("Content-Length")
    return 0, int(length) if length is not None else None


def fetch(item: RemoteFile, on_bytes: Callable[[int], None] = lambda n: None, *, retries: int = 5,
          timeout: float = 60.0, backoff_s: float = 1.0) -> Fetched:
    """Download `item.url` to `item.dest` (resuming its `.part`), verify it, rename it into place."""
    dest = Path(item.dest)
    if dest.is_file() and (item.size is None or dest.stat().st_size == item.size):
        return Fetched(item, dest.stat().st_size, 0)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part(dest)
    resumed_from = part.stat().st_size if part.exists() else 0
    downloaded, total, server_md5, failures = 0, None, None, 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if total is not None and have == total:
            break
        try:
            with _open(item.url, have, timeout) as resp:
                offset, total = _total(resp, have)
                server_md5 = _goog_md5(resp.headers) or server_md5
                if item.size is not None and total is not None and total != item.size:
                    raise FetchError(f"{item.url}: the server says {total} bytes, the published size is {item.size}")
                mode = "ab" if offset == have and have else "wb"  # 200 to a range request: the whole file again
                with open(part, mode) as out:
                    for block in iter(lambda: resp.read(_CHUNK), b""):
                        out.write(block)
                        downloaded += len(block)
                        on_bytes(len(block))
            have = part.stat().st_size
            if total is None:  # no declared length: the stream's end is the file's end
                total = have
            if have == total:
                break
            if have > total:
                part.unlink()
                raise FetchError(f"{item.url}: got {have} bytes, more than the {total} the server declared")
            failures += 1  # the connection ended early: resume
            error: Exception = ConnectionError(f"connection closed at {have} of {total} bytes")
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:  # the part is already the whole file, or longer: check it below
                total = total if total is not None else (item.size or have)
                if have == total:
                    break
                part.unlink()
                continue
            if err.code < 500 and err.code != 429:
                raise FetchError(f"{item.url}: HTTP {err.code} {err.reason}") from None
            failures, error = failures + 1, err
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                kept = part.stat().st_size if part.exists() else 0
                raise FetchError(f"{item.url}: disk full writing {part} ({kept} of {total or '?'} bytes kept; free "
                                 f"space and re-run to resume)") from None
            if isinstance(err, urllib.error.URLError) and not isinstance(err.reason, (socket.timeout, OSError)):
                raise FetchError(f"{item.url}: {err.reason}") from None
            failures, error = failures + 1, err
        except (http.client.HTTPException, socket.timeout) as err:
            failures, error = failures + 1, err
        if failures > retries:
            kept = part.stat().st_size if part.exists() else 0
            raise FetchError(f"{item.url}: failed after {retries} retries ({error}); {kept} bytes kept in {part}, "
                             f"a re-run resumes") from None
        time.sleep(min(backoff_s * 2 ** (failures - 1), 30.0))
    size = part.stat().st_size
    if item.size is not None and size != item.size:
        part.unlink()
        raise FetchError(f"{item.url}: {size} bytes, the published size is {item.size}")
    expected, source = (item.md5, "published") if item.md5 else (server_md5, "server")
    if expected:
        actual = file_md5(part)
        if actual != expected.lower():
            part.unlink()
            if resumed_from:  # perhaps a stale part of an older copy of the file: once more, whole
                return fetch(item, on_bytes, retries=retries, timeout=timeout, backoff_s=backoff_s)
            raise FetchError(f"{item.url}: MD5 {actual} differs from the {source} {expected} (part deleted)")
    os.replace(part, dest)
    return Fetched(item, size, downloaded, resumed_from, source if expected else None)


def fetch_all(items: list[RemoteFile], workers: int = 4, desc: str = "download", **kwargs
              ) -> tuple[list[Fetched], list[tuple[RemoteFile, str]]]:
    """`fetch` each item on `workers` threads with one progress report in MB; (done, [(item, error)])."""
    from qformer.core.progress import Progress  # lazy: tqdm, only when something is fetched

    lock, pending = threading.Lock(), [0]
    with Progress(None, desc, unit="MB", log_every_s=10) as progress:
        def on_bytes(n: int) -> None:
            with lock:
                pending[0] += n
                whole, pending[0] = divmod(pending[0], 1 << 20)
            if whole:
                progress.update(whole)

        done, failed = [], []
        with ThreadPoolExecutor(max(1, workers)) as pool:
            futures = {pool.submit(fetch, item, on_bytes, **kwargs): item for item in items}
            for future in as_completed(futures):
                try:
                    done.append(future.result())
                except FetchError as err:
                    failed.append((futures[future], str(err)))
    return done, failed
