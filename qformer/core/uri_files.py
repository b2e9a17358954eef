"""Files in object storage (`s3://`, `gs://`) as local files: the pyarrow file system for a URI, and a local
copy of an object or a prefix, made once, for loaders that need a path (torch.load, BERT's from_pretrained).

An S3-compatible endpoint comes from the caller (`run.data.s3_endpoint`), else the standard
`AWS_ENDPOINT_URL`; credentials from the usual AWS chain. Local copies live under
`$QFORMER_HOME/cache/uri/<hash of the URI>/` and are written under a temporary name and renamed, so a copy
cut short is never taken for a whole one. pyarrow is imported inside the functions.
"""
from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import shutil
from pathlib import Path

from qformer.core.paths import qformer_home

URI_SCHEMES = ("s3://", "gs://")


def is_object_uri(value: str) -> bool:
    return str(value).startswith(URI_SCHEMES)


@functools.lru_cache(maxsize=16)
def _s3(endpoint: str | None):
    import pyarrow.fs as pafs  # lazy: see the module docstring

    if not endpoint:
        return pafs.S3FileSystem()
    scheme = "http" if endpoint.startswith("http://") else "https"
    return pafs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[-1], scheme=scheme)


def filesystem(target: str, endpoint: str | None = None):
    """(pyarrow FileSystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs  # lazy: see the module docstring

    target = str(target)
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    if target.startswith("s3://"):
        return _s3(endpoint), target[len("s3://"):]
    if "://" in target:
        return pafs.FileSystem.from_uri(target)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(target))


def local_copy(uri: str, endpoint: str | None = None) -> Path:
    """A local path holding the object `uri`, or every object under the prefix `uri` (a folder); copied on first
    use. FileNotFoundError when there is neither."""
    import pyarrow.fs as pafs  # lazy: see the module docstring

    uri = str(uri).rstrip("/")
    dest = qformer_home() / "cache" / "uri" / hashlib.sha1(uri.encode()).hexdigest()[:16] / posixpath.basename(uri)
    if dest.exists():
        return dest
    fs, path = filesystem(uri, endpoint)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such object or prefix")
    files = [info] if info.type == pafs.FileType.File else \
        [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
    tmp = dest.with_name(f"{dest.name}.partial-{os.getpid()}")  # per process: several workers of a node may race
    shutil.rmtree(tmp, ignore_errors=True)
    for f in files:
        out = tmp if info.type == pafs.FileType.File else tmp / f.path[len(path.rstrip("/")) + 1:]
        out.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f.path) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process put the folder there first
        if not dest.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
