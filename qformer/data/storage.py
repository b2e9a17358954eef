"""Where training data lives: local paths and object-storage URIs, through one pyarrow filesystem layer.

`s3://bucket/key` (AWS or any S3-compatible server), `gs://bucket/key` and local paths are handled
alike, so shard lists and image roots may point at either. An S3-compatible endpoint comes from
`run.data.s3_endpoint`, else the standard `AWS_ENDPOINT_URL`; credentials from the usual AWS chain
(environment, config files, instance roles). Ray Data's readers are given the same filesystem.

Shard specs as users write them (img2dataset, LAVIS's laion builder):
- a brace pattern: `laion/{00000..01023}.tar` (zero padding kept), `{a,b}` alternatives;
- a glob: `cc3m/*.parquet` (listed, sorted);
- a list of any of these.

pyarrow is imported inside the functions: `qformer config` imports this module (through the builders)
and need not pay for pyarrow.
"""
from __future__ import annotations

import fnmatch
import itertools
import os
import posixpath
import re
from pathlib import Path
from typing import Iterable

from qformer.core.errors import ConfigError
from qformer.core.uri_files import filesystem

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = set("*?[")


def is_uri(value: str) -> bool:
    return "://" in str(value)


def join(root: str, relative: str) -> str:
    """`relative` under `root` (either may be a URI); an absolute path or a URI is returned as is."""
    relative = str(relative)
    if is_uri(relative) or os.path.isabs(relative):
        return relative
    if is_uri(root):
        return root.rstrip("/") + "/" + relative.lstrip("/")
    return str(Path(root) / relative)


def read_bytes(target: str, endpoint: str | None = None) -> bytes:
    """The whole object/file. Raises FileNotFoundError / OSError as the filesystem does."""
    if not is_uri(target):
        with open(target, "rb") as f:
            return f.read()
    fs, path = filesystem(target, endpoint)
    with fs.open_input_file(path) as f:
        return f.read()


class StorageError(ConfigError):
    """Object storage said no for a reason other than "no such key": denied, unreachable, no such bucket."""


_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN", "InvalidToken",
           "Forbidden", "HTTP response code: 403")
_UNREACHABLE = ("NETWORK_CONNECTION", "curlCode", "Could not resolve", "timed out", "Timeout", "REQUEST_TIMEOUT",
                "SERVICE_UNAVAILABLE")


def storage_error(err: Exception, target: str, endpoint: str | None = None) -> StorageError | None:
    """A one-line StorageError naming the endpoint, the bucket and what to fix, or None when `err` is a plain
    "not found" (which callers report as missing shards) or not from object storage."""
    if not is_uri(target):
        return None
    text = str(err)
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    where = f"endpoint {endpoint}" if endpoint else "AWS S3 (no endpoint set)"
    bucket = target.split("://", 1)[1].split("/", 1)[0]
    detail = text.split(" operation: ", 1)[-1].split(" (Request ID", 1)[0][:160]
    if any(s in text for s in _DENIED):
        return StorageError(f"access denied to bucket {bucket} at {where}: check the credentials (AWS_ACCESS_KEY_ID / "
                            f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the node's role) and the bucket policy ({detail})",
                            "run.data.s3_endpoint")
    if any(s in text for s in _UNREACHABLE):
        return StorageError(f"cannot reach {where} for bucket {bucket}: check run.data.s3_endpoint (or "
                            f"AWS_ENDPOINT_URL) and the network from this machine ({detail})", "run.data.s3_endpoint")
    if "NO_SUCH_BUCKET" in text:
        return StorageError(f"bucket {bucket} does not exist at {where} (is run.data.s3_endpoint the right server?)",
                            "run.data.s3_endpoint")
    return None


def _expand_braces(pattern: str) -> list[str]:
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        lo, hi = numeric.group(1), numeric.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return list(itertools.chain.from_iterable(_expand_braces(head + o + tail) for o in options))


def _split_uri(target: str) -> tuple[str, str]:
    """('s3://', 'bucket/key') or ('', '/abs/path')."""
    if is_uri(target):
        scheme, rest = target.split("://", 1)
        return f"{scheme}://", rest
    return "", os.path.abspath(os.path.expanduser(target))


def _glob(pattern: str, endpoint: str | None) -> list[str]:
    import pyarrow.fs as pafs  # lazy: see the module docstring

    prefix, path = _split_uri(pattern)
    parts = path.split("/")
    fixed = next(i for i, p in enumerate(parts) if set(p) & _GLOB_CHARS)
    base = "/".join(parts[:fixed]) or "/"
    fs, base_in_fs = filesystem(prefix + base, endpoint) if prefix else (pafs.LocalFileSystem(), base)
    recursive = len(parts) - fixed > 1 or "**" in path
    try:
        infos = fs.get_file_info(pafs.FileSelector(base_in_fs, recursive=recursive))
    except OSError as err:  # as in `missing`: no folder, no shards; a denied or unreachable store says so
        error = None if isinstance(err, FileNotFoundError) else storage_error(err, pattern, endpoint)
        if error is not None:
            raise error from None
        return []
    root_in_fs = base_in_fs.rstrip("/")
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        full = base.rstrip("/") + info.path[len(root_in_fs):]
        if fnmatch.fnmatch(full, path):
            out.append(prefix + full)
    return sorted(out)


def expand(spec: str | Iterable[str], endpoint: str | None = None) -> list[str]:
    """Shard spec(s) -> concrete names, in a stable order. Globs are listed; brace patterns are not
    checked here (see `missing`), so a named shard that does not exist is reported, not dropped."""
    specs = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    out: list[str] = []
    for item in specs:
        for name in _expand_braces(item):
            out.extend(_glob(name, endpoint) if set(name) & _GLOB_CHARS else [name])
    return out


def missing(paths: list[str], endpoint: str | None = None) -> list[str]:
    """The entries of `paths` that are not files. One listing per folder, not one request per shard."""
    import pyarrow.fs as pafs  # lazy: see the module docstring

    by_dir: dict[str, list[str]] = {}
    for p in paths:
        by_dir.setdefault(posixpath.dirname(p) if is_uri(p) else os.path.dirname(os.path.abspath(p)), []).append(p)
    absent = []
    for folder, names in by_dir.items():
        fs, folder_in_fs = filesystem(folder, endpoint)
        try:
            infos = fs.get_file_info(pafs.FileSelector(folder_in_fs, recursive=False))
            present = {posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File}
        except OSError as err:  # a folder that is not there holds no shards; anything else is not "missing"
            error = None if isinstance(err, FileNotFoundError) else storage_error(err, folder, endpoint)
            if error is not None:
                raise error from None
            present = set()
        absent.extend(n for n in names if posixpath.basename(n) not in present)
    return absent


def upload_files(local: str | Path, relative: Iterable[str | Path], uri: str, endpoint: str | None = None,
                 workers: int = 8) -> int:
    """Copy `local/<rel>` to `uri/<rel>` for each path in `relative`, on `workers` threads; returns the count."""
    from concurrent.futures import ThreadPoolExecutor

    fs, base = filesystem(uri, endpoint)
    base = base.rstrip("/")

    def put(rel) -> None:
        rel = Path(rel).as_posix()
        with open(Path(local) / rel, "rb") as src, fs.open_output_stream(f"{base}/{rel}") as out:
            while block := src.read(1 << 20):
                out.write(block)

    rels = list(relative)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(put, rels))
    return len(rels)


def upload_tree(local: str | Path, uri: str, endpoint: str | None = None) -> int:
    """Copy every file under `local` to `uri` (s3://bucket/prefix); returns the number of files."""
    files = sorted(p.relative_to(local) for p in Path(local).rglob("*") if p.is_file())
    return upload_files(local, files, uri, endpoint)


def write_bytes(target: str, data: bytes, endpoint: str | None = None) -> None:
    """Write a whole file/object, whole or not at all: locally a hidden temporary file (a fixed name, so a
    rerun overwrites what a killed write left) renamed over the target, its folders made; in object storage
    the object appears when its upload completes."""
    if not is_uri(target):
        folder, base = os.path.split(os.path.abspath(os.path.expanduser(target)))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{base}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(folder, base))
        return
    fs, path = filesystem(target, endpoint)
    with fs.open_output_stream(path) as out:
        out.write(data)


def exists(target: str, endpoint: str | None = None) -> bool:
    """Whether a file/object is there (a denied or unreachable store raises its StorageError)."""
    if not is_uri(target):
        return os.path.isfile(target)
    return not missing([target], endpoint)
