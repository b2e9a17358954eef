"""Unpacking downloaded archives (zip, tar) so that nothing half-unpacked ever looks complete.

An archive unpacks into a hidden sibling folder `<target>/.<archive>.partial/` first; only when every
member was read (zip and tar check each member's length, zip its CRC too) are the files moved into
`<target>` and a marker `<target>/.<archive>.extracted` written, last. A re-run that finds the marker does
nothing; one that finds a `.partial` folder (a run stopped mid-way) deletes it and starts again. A damaged
archive (truncated, garbage) and a full disk each stop with an `ArchiveError` naming the archive, and
leave no `.partial` folder and no marker.

`strip` drops leading folders of the member paths: Visual Genome's `VG_100K/<id>.jpg` and
`VG_100K_2/<id>.jpg` both land in `vg/images/<id>.jpg`, the one folder vg_caption's paths are re-rooted to.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath


class ArchiveError(Exception):
    """An archive could not be unpacked; the message names it and says what was kept."""


def marker_path(target: Path, archive_name: str) -> Path:
    return Path(target) / f".{archive_name}.extracted"


def is_extracted(target: Path, archive_name: str) -> bool:
    return marker_path(target, archive_name).is_file()


def _members(archive: Path):
    """(posix member path, file-like opener) for each regular file of a zip or tar archive."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, lambda info=info: zf.open(info)
        return
    if archive.suffix.lower() == ".zip":  # no central directory at the end: cut short
        raise ArchiveError(f"{archive} is damaged (truncated or corrupt: not a complete zip file); nothing of it "
                           f"was unpacked. Delete it and re-run to fetch it again")
    try:
        tf = tarfile.open(archive, "r:*")
    except tarfile.ReadError:
        raise ArchiveError(f"{archive} is damaged or not an archive (neither zip nor tar); nothing of it was "
                           f"unpacked. Delete it and re-run to fetch it again") from None
    with tf:
        for info in tf:
            if info.isfile():
                yield info.name, lambda info=info: tf.extractfile(info)


def _relative(name: str, strip: int) -> Path | None:
    """The member's path below the target after dropping `strip` leading folders; None to skip it.
    Absolute paths and `..` are refused (an archive must not write outside its target)."""
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or ".." in parts:
        raise ArchiveError(f"member {name!r} points outside the target folder")
    parts = parts[strip:]
    return Path(*parts) if parts else None


def extract(archive: Path, target: Path, strip: int = 0) -> list[Path]:
    """Unpack `archive` into `target` (see the module docstring); returns the files' paths relative to
    `target` (none when the marker says it was done before)."""
    archive, target = Path(archive), Path(target)
    if is_extracted(target, archive.name):
        return []
    target.mkdir(parents=True, exist_ok=True)
    partial = target / f".{archive.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    files: list[Path] = []
    try:
        for name, opener in _members(archive):
            rel = _relative(name, strip)
            if rel is None:
                continue
            out = partial / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with opener() as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            files.append(rel)
    except (zipfile.BadZipFile, zlib.error, EOFError, tarfile.ReadError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise ArchiveError(f"{archive} is damaged (truncated or corrupt: {err}); nothing of it was unpacked. "
                           f"Delete it and re-run to fetch it again") from None
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ArchiveError(f"disk full unpacking {archive} into {target}: nothing of it was kept (it holds "
                               f"{_unpacked_size(archive)} bytes unpacked); free space and re-run") from None
        raise
    except ArchiveError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    for rel in files:  # same file system: renames, no copy, no space needed
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial / rel, target / rel)
    shutil.rmtree(partial, ignore_errors=True)
    write_marker(target, archive.name, {"archive": archive.name, "bytes": archive.stat().st_size, "files": len(files)})
    return files


def write_marker(target: Path, archive_name: str, info: dict) -> None:
    path = marker_path(target, archive_name)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def _unpacked_size(archive: Path) -> int | str:
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                return sum(i.file_size for i in zf.infolist())
        with tarfile.open(archive, "r:*") as tf:
            return sum(i.size for i in tf if i.isfile())
    except Exception:  # noqa: BLE001 - only for the message
        return "?"
