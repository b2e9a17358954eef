"""`data check` for shard datasets: which named shards are missing, and what the shards hold, by reading them.

Metadata (img2dataset's `<shard>_stats.json`, Parquet footers) says what a shard should hold; only reading
it says what training gets. So a seeded sample of `sample` shards (all of them with `--full`) is read
with the training reader (qformer.data.shard_records) and the report gives both: "verified N of M
shards: R readable, L lost; metadata says X". Each damaged shard is named with what was lost, and fails
the check. With `--full` on a Ray cluster the shards are read by Ray tasks, else by a thread pool here.
"""
from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from qformer.core.errors import ConfigError
from qformer.data.shard_records import ShardReading, metadata_count, read_samples
from qformer.data.shard_set import ShardSet
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
    verified: int = 0  # shards read whole
    readable: int = 0  # samples training gets from the verified shards
    lost: Counter = field(default_factory=Counter)  # samples lost in them, by reason
    multi: int = 0  # readable samples with several captions (training draws one per pass)
    captions: int = 0  # captions of the readable samples
    metadata: int = 0  # what the verified shards' metadata says they hold
    metadata_shards: int = 0  # how many of them have metadata
    damaged: list[str] = field(default_factory=list)  # one line per damaged shard: what was lost
    lossy: list[str] = field(default_factory=list)  # shards that lost records (no caption, ...) without damage
    problems: list[str] = field(default_factory=list)  # the first lost records, "shard#record: why"

    @property
    def present(self) -> int:
        return self.shards - len(self.missing)

    @property
    def estimate(self) -> int:
        """Readable samples in all present shards, scaled from the verified ones."""
        return self.readable if not self.verified else round(self.readable * self.present / self.verified)


def missing_shards_error(shards: ShardSet, absent: list[str]) -> ConfigError:
    shown = ", ".join(absent[:SHOW]) + (f" and {len(absent) - SHOW} more" if len(absent) > SHOW else "")
    return ConfigError(f"{len(absent)} of {len(shards.shards)} shards do not exist: {shown}",
                       f"datasets.{shards.name}.build_info.storage")


def check_present(shards: ShardSet) -> None:
    """ConfigError listing the named shards that are not there (one listing per folder)."""
    absent = missing(list(shards.shards), shards.endpoint)
    if absent:
        raise missing_shards_error(shards, absent)


def verify_shard(shards: ShardSet, path: str) -> ShardReading:
    """Read one shard whole as training would (images are not decoded); metadata's count beside it."""
    reading = ShardReading(path)
    for _ in read_samples(shards, path, reading):
        pass
    if reading.expected is None:
        fs, inner = filesystem(path, shards.endpoint)
        reading.expected = metadata_count(shards, fs, inner)
    return reading


def _read_all(shards: ShardSet, paths: list[str], workers: int, use_ray: bool) -> list[ShardReading]:
    if use_ray:
        import ray  # lazy: only a --full check on a cluster uses Ray

        task = ray.remote(num_cpus=0.5)(verify_shard)
        return ray.get([task.remote(shards, p) for p in paths])
    with ThreadPoolExecutor(max(1, workers)) as pool:  # reading is I/O: threads overlap it
        return list(pool.map(lambda p: verify_shard(shards, p), paths))


def shard_report(name: str, shards: ShardSet, spec, sample: int | None = SAMPLE_SHARDS, workers: int = 4,
                 use_ray: bool = False) -> ShardReport:
    """Missing shards, then `sample` present shards (None: all) read and compared with their metadata."""
    report = ShardReport(name, str(spec), shards.format, len(shards.shards))
    report.missing = missing(list(shards.shards), shards.endpoint)
    absent = set(report.missing)
    present = [p for p in shards.shards if p not in absent]
    picked = present if sample is None or len(present) <= sample else random.Random(0).sample(present, sample)
    claims = []
    for reading in _read_all(shards, picked, workers, use_ray):
        report.verified += 1
        report.readable += reading.kept
        report.multi += reading.multi
        report.captions += reading.captions
        report.lost.update(reading.lost)
        claims.append(reading.expected)
        if reading.damage:
            report.damaged.append(reading.summary())
        elif reading.lost:
            report.lossy.append(reading.summary())
        report.problems += reading.messages[: SHOW - len(report.problems)] if len(report.problems) < SHOW else []
    known = [c for c in claims if c is not None]
    report.metadata, report.metadata_shards = sum(known), len(known)
    return report


def format_shard_report(r: ShardReport, show: int = 20) -> list[str]:
    lost = sum(r.lost.values())
    how = "all" if r.verified == r.present else "a seeded sample; --full reads all"
    if not r.metadata_shards:
        says = "; no metadata to compare"
    elif r.metadata_shards == r.verified:
        says = f"; metadata says {r.metadata}"
    else:
        says = f"; metadata says {r.metadata} for the {r.metadata_shards} of them that have it"
    lines = [f"{r.dataset}/train: {r.spec}",
             f"  {r.format} shards {r.shards}  missing {len(r.missing)}  verified {r.verified} of {r.present} ({how})",
             f"  samples {r.readable} readable, {lost} lost" + (
                 " (" + ", ".join(f"{k} {n}" for k, n in sorted(r.lost.items())) + ")" if lost else "") + says]
    if r.multi:
        lines.append(f"  captions {r.captions} ({r.captions / max(1, r.readable):.2f} a sample): {r.multi} samples "
                     "with several, training draws one of them per pass")
    if r.verified and r.verified < r.present:
        lines.append(f"  about {r.estimate} readable samples in all {r.present} shards (from the {r.verified} read)")
    if r.missing:
        lines.append(f"  ERROR {len(r.missing)} shards do not exist (datasets.{r.dataset}.build_info.storage): "
                     + ", ".join(r.missing[:SHOW]) + (" ..." if len(r.missing) > SHOW else ""))
    for line in r.damaged[:show]:
        lines.append(f"  ERROR damaged shard {line}")
    if len(r.damaged) > show:
        lines.append(f"  ... and {len(r.damaged) - show} more damaged shards")
    for line in r.lossy[:show]:
        lines.append(f"  lost records in {line}")
    for problem in r.problems[:show]:
        lines.append(f"  skipped {problem}")
    return lines
