"""What can be known about a shard dataset without reading it all: which named shards are missing, and
how many samples it holds.

Samples are counted from metadata where the format has it (Parquet footers, img2dataset's
`<shard>_stats.json` beside each tar), else by reading shards (a CSV row with a newline inside a quoted
caption counts twice: an estimate). With more shards than `sample`, a
seeded sample of them is counted and the total estimated from it, so a 100k-shard set is checked in
seconds; the report says which.
"""
from __future__ import annotations

import json
import random
import tarfile
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from qformer.core.errors import ConfigError
from qformer.data.shard_set import WDS_IMAGE_EXTS, ShardSet
from qformer.data.storage import filesystem, missing

SAMPLE_SHARDS = 8
SHOW = 10


@dataclass
class ShardReport:
    dataset: str
    spec: str
    format: str
    shards: int
    missing: list[str] = field(default_factory=list)
    samples: int = 0
    exact: bool = True  # False: estimated from `counted` shards
    counted: int = 0
    problems: list[str] = field(default_factory=list)  # unreadable shards, bad records, in the counted ones


def missing_shards_error(shards: ShardSet, absent: list[str]) -> ConfigError:
    shown = ", ".join(absent[:SHOW]) + (f" and {len(absent) - SHOW} more" if len(absent) > SHOW else "")
    return ConfigError(f"{len(absent)} of {len(shards.shards)} shards do not exist: {shown}",
                       f"datasets.{shards.name}.build_info.storage")


def check_present(shards: ShardSet) -> None:
    """ConfigError listing the named shards that are not there (one listing per folder)."""
    absent = missing(list(shards.shards), shards.endpoint)
    if absent:
        raise missing_shards_error(shards, absent)


def _metadata_count(shards: ShardSet, path: str) -> int | None:
    fs, inner = filesystem(path, shards.endpoint)
    try:
        if shards.format == "parquet":
            with fs.open_input_file(inner) as f:
                return int(pq.ParquetFile(f).metadata.num_rows)
        if shards.format == "wds":
            stats = inner[: -len(".tar")] + "_stats.json"
            with fs.open_input_file(stats) as f:
                return int(json.loads(f.read())["successes"])
    except (OSError, KeyError, ValueError):
        return None
    return None


def _read_count(shards: ShardSet, path: str, problems: list[str]) -> int:
    """Samples in one shard without Ray (Ray Data's readers need a running Ray: they put their paths in the
    object store): WebDataset keys with an image member, or manifest rows."""
    fs, inner = filesystem(path, shards.endpoint)
    keys: set[str] = set()
    try:
        with fs.open_input_stream(inner) as f:
            if shards.format == "wds":
                with tarfile.open(fileobj=f, mode="r|*") as tar:
                    for member in tar:
                        key, _, ext = member.name.rpartition("/")[2].partition(".")
                        if ext.lower() in ((shards.image_key,) if shards.image_key else WDS_IMAGE_EXTS):
                            keys.add(key)
                return len(keys)
            data = f.read()
        if shards.format == "jsonl":
            return sum(1 for line in data.splitlines() if line.strip())
        return max(0, sum(1 for line in data.splitlines() if line.strip()) - 1)  # csv: minus the header
    except (OSError, tarfile.TarError, EOFError) as err:
        problems.append(f"{path}: shard unreadable after {len(keys)} samples ({type(err).__name__}: {err})")
        return len(keys)


def count(shards: ShardSet, report: ShardReport, sample: int = SAMPLE_SHARDS) -> None:
    present = [p for p in shards.shards if p not in set(report.missing)]
    picked = present if len(present) <= sample else random.Random(0).sample(present, sample)
    total = 0
    for path in picked:
        n = _metadata_count(shards, path)
        if n is None:
            n = _read_count(shards, path, report.problems)
        total += n
    report.counted = len(picked)
    report.exact = len(picked) == len(present)
    report.samples = total if report.exact or not picked else round(total * len(present) / len(picked))


def shard_report(name: str, shards: ShardSet, spec, sample: int = SAMPLE_SHARDS) -> ShardReport:
    report = ShardReport(name, str(spec), shards.format, len(shards.shards))
    report.missing = missing(list(shards.shards), shards.endpoint)
    count(shards, report, sample)
    return report


def format_shard_report(r: ShardReport, show: int = 20) -> list[str]:
    how = "counted" if r.exact else f"estimated from {r.counted} of {r.shards - len(r.missing)} shards"
    lines = [f"{r.dataset}/train: {r.spec}",
             f"  {r.format} shards {r.shards}  samples {r.samples} ({how})  missing {len(r.missing)}"]
    if r.missing:
        lines.append(f"  ERROR {len(r.missing)} shards do not exist (datasets.{r.dataset}.build_info.storage): "
                     + ", ".join(r.missing[:SHOW]) + (" ..." if len(r.missing) > SHOW else ""))
    for problem in r.problems[:show]:
        lines.append(f"  skipped {problem}")
    if len(r.problems) > show:
        lines.append(f"  ... and {len(r.problems) - show} more")
    return lines
