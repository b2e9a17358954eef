"""`qformer data download coco|vg|flickr30k`: LAVIS's annotation files and image archives into the layout
the builders read, under a local data root or an object-storage prefix.

Per asset of qformer.data.download_catalog: an annotation file already there, or an archive whose unpack
marker is there, is skipped (a re-run fetches only what is missing or incomplete); the rest is fetched in
parallel (qformer.core.http_fetch: resumed, verified), then each complete archive is unpacked
(qformer.data.archives: nothing half-unpacked looks complete) and deleted unless `keep_archives`.

A bucket root (`s3://...`) stages files under a local folder first (`staging`, default
$QFORMER_HOME/cache/download/<bucket path>): annotations are uploaded as they are, archives are unpacked
there and their files uploaded, and the unpack marker is written to the bucket last. The staging folder
keeps `.part` files across runs, so an interrupted bucket download resumes too.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from qformer.core.http_fetch import RemoteFile, fetch_all, mirrored
from qformer.core.logs import get_logger
from qformer.core.paths import data_root, qformer_home
from qformer.data.archives import ArchiveError, extract, marker_path
from qformer.data.download_catalog import Asset, dataset_download
from qformer.data.storage import exists, is_uri, join, read_bytes, upload_files, write_bytes

log = get_logger(__name__)


@dataclass
class DownloadReport:
    root: str
    lines: list[str] = field(default_factory=list)  # one per asset: what happened
    failed: list[str] = field(default_factory=list)  # one per asset that is still missing, with why
    notes: list[str] = field(default_factory=list)
    fetched_bytes: int = 0

    def summary(self) -> str:
        head = (f"data download into {self.root}: {len(self.lines) - len(self.failed)} of {len(self.lines)} "
                f"files in place, {self.fetched_bytes / 1e6:.1f} MB fetched")
        out = [head] + [f"  {line}" for line in self.lines]
        if self.failed:
            out.append(f"still missing ({len(self.failed)}; a re-run resumes):")
            out += [f"  {line}" for line in self.failed]
        return "\n".join(out + self.notes)


def _staging(root: str, staging: str | None) -> Path:
    if staging:
        return Path(staging)
    tag = hashlib.sha1(root.encode()).hexdigest()[:8]
    return qformer_home() / "cache" / "download" / f"{root.split('://', 1)[-1].strip('/').replace('/', '_')}-{tag}"


def _remote_marker(root: str, asset: Asset) -> str:
    return join(root, f"{asset.extract_to}/{marker_path(Path('.'), Path(asset.path).name).name}")


def _done(root: str, asset: Asset, endpoint: str | None) -> bool:
    if asset.extract_to is None:
        return exists(join(root, asset.path), endpoint)
    return exists(_remote_marker(root, asset), endpoint)


def download(names: list[str], root: str | None = None, mirrors: dict[str, str] | None = None, workers: int = 4,
             keep_archives: bool = False, staging: str | None = None, endpoint: str | None = None,
             **fetch_kwargs) -> DownloadReport:
    """Fetch and unpack every asset of the data sets `names` under `root` (default: the data root)."""
    root = str(root) if root and is_uri(str(root)) else str(Path(root).expanduser().resolve() if root else data_root())
    remote = is_uri(root)
    local = _staging(root, staging) if remote else Path(root)
    report = DownloadReport(root)
    todo: list[tuple[str, Asset]] = []
    for name in names:
        plan = dataset_download(name)
        if plan.note:
            report.notes.append(plan.note)
        for asset in plan.assets:
            if _done(root, asset, endpoint):
                what = "unpacked before" if asset.extract_to else "present"
                report.lines.append(f"{asset.extract_to or asset.path}: {what} ({Path(asset.path).name})")
            else:
                todo.append((name, asset))
    if not todo:
        return report
    items = [RemoteFile(mirrored(a.url, mirrors), local / a.path, md5=a.md5) for _, a in todo]
    log.info("fetching %d files into %s (%s)", len(items), root, ", ".join(sorted({n for n, _ in todo})))
    done, failed = fetch_all(items, workers=workers, desc="data download", **fetch_kwargs)
    by_dest = {f.file.dest: f for f in done}
    report.fetched_bytes = sum(f.downloaded for f in done)
    for item, error in failed:
        report.failed.append(error)
        report.lines.append(f"{Path(item.dest).relative_to(local)}: FAILED")
    for (_, asset), item in zip(todo, items):
        got = by_dest.get(item.dest)
        if got is None:
            continue
        how = f"fetched {got.downloaded / 1e6:.1f} MB" + (f" (resumed at {got.resumed_from / 1e6:.1f} MB)"
                                                          if got.resumed_from else "")
        how += f", MD5 checked ({got.md5_checked})" if got.md5_checked else ", size checked"
        try:
            if asset.extract_to is None:
                if remote:
                    upload_files(local, [asset.path], root, endpoint)
                report.lines.append(f"{asset.path}: {how}")
                continue
            files = extract(item.dest, local / asset.extract_to, asset.strip)
            if remote:
                upload_files(local / asset.extract_to, files, join(root, asset.extract_to), endpoint)
                write_bytes(_remote_marker(root, asset), read_bytes(str(marker_path(local / asset.extract_to,
                                                                                    item.dest.name))), endpoint)
                shutil.rmtree(local / asset.extract_to, ignore_errors=True)
            report.lines.append(f"{asset.extract_to}: {how}, unpacked {len(files)} files from {item.dest.name}")
            if not keep_archives:
                os.remove(item.dest)
        except ArchiveError as err:
            report.failed.append(str(err))
            report.lines.append(f"{asset.extract_to}: FAILED to unpack {item.dest.name}")
    return report
