"""One shard's samples, streamed: every readable sample is kept, every lost one is counted with why.

No Ray and no Ray Data readers here: a read task (qformer.data.shard_source) and `qformer data check`
both read shards through `read_samples`, so the check reports what training would get.
- WebDataset tars (qformer.data.tar_stream): members are grouped by key (the name up to the first dot
  of its base name) whatever their order; extensions match in any case (`.JPG`); a duplicated member
  keeps the first copy; a sample is handed on once it has an image and a caption and a member of
  another key arrives, so memory holds the samples still incomplete, not the shard. At damage (a cut,
  garbage) every complete sample before it is kept, and the loss is what img2dataset's
  `<shard>_stats.json` says the shard held minus what was read (at least the sample cut).
- JSONL / CSV manifests: parsed line by line; a malformed line costs that line, named by number.
- Parquet: row group by row group, in record batches; a damaged row group costs its own rows (from the
  footer), the others are read.
A sample is (name or image path, encoded image bytes or None, caption). A sample may carry several
captions (a `captions` list in the WebDataset json, a list in the `captions` or caption column of Parquet
and JSONL; what `qformer data capfilt` writes): its caption is then a tuple of them, and training draws
one per pass (qformer.data.shard_source). One usable caption in a list is a plain str, as in any shard.
"""
from __future__ import annotations

import csv
import io
import json
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

from qformer.data.shard_set import WDS_IMAGE_EXTS, ShardSet
from qformer.data.stats import DAMAGED, MALFORMED, NO_CAPTION, NO_IMAGE
from qformer.data.storage import filesystem, join
from qformer.data.tar_stream import TarDamage, tar_members

MAX_INCOMPLETE = 1024  # tar samples waiting for their other members; past this the oldest is settled
MAX_MESSAGES = 20
Caption = str | tuple[str, ...] | None  # None only when read with captionless=True
CAPTIONS_KEY = "captions"  # a sample's list of captions (json field, Parquet/JSONL column)


@dataclass
class ShardReading:
    """What reading one shard gave: samples kept, samples lost by reason, the first messages, the damage."""

    path: str
    kept: int = 0
    lost: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)
    damage: str | None = None  # "damaged at byte N: why" / "unreadable: why"
    expected: int | None = None  # what the shard's metadata says it holds, where it says
    multi: int = 0  # kept samples with several captions
    captions: int = 0  # captions of the kept samples

    def lose(self, reason: str, message: str, n: int = 1) -> None:
        self.lost[reason] += n
        self.note(message)

    def note(self, message: str) -> None:
        """Keep one of the first MAX_MESSAGES messages (a shard of duplicates must not grow a list per member)."""
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(f"{self.path}#{message}" if not message.startswith(self.path) else message)

    @property
    def lost_total(self) -> int:
        return sum(self.lost.values())

    def summary(self) -> str:
        """One line for a log or the data check."""
        parts = [f"{self.kept} samples kept"]
        if self.lost:
            parts.append(f"{self.lost_total} lost (" + ", ".join(f"{r} {n}" for r, n in sorted(self.lost.items())) + ")")
        if self.damage:
            parts.append(self.damage)
        if self.expected is not None:
            parts.append(f"metadata says {self.expected}")
        return f"{self.path}: " + "; ".join(parts)


def caption_text(value) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) and value.strip() else None


def captions_of(value) -> str | tuple[str, ...] | None:
    """A caption or a list of them -> the usable text(s): one is a plain str, several a tuple, none None."""
    if not isinstance(value, (list, tuple)):
        return caption_text(value)
    texts = tuple(t for t in map(caption_text, value) if t is not None)
    return texts if len(texts) > 1 else (texts[0] if texts else None)


def read_samples(shards: ShardSet, path: str, reading: ShardReading,
                 captionless: bool = False) -> Iterator[tuple[str, bytes | None, Caption]]:
    """The shard's usable samples in file order; losses and damage go to `reading`. `captionless`: a sample
    with an image but no usable caption is handed on with caption None instead of lost (CapFilt captions it)."""
    reader = {"wds": _wds, "parquet": _parquet, "jsonl": _jsonl, "csv": _csv}[shards.format]
    fs, inner = filesystem(path, shards.endpoint)
    try:
        for sample in reader(shards, path, fs, inner, reading, captionless):
            reading.kept += 1
            reading.multi += isinstance(sample[2], tuple)
            reading.captions += len(sample[2]) if isinstance(sample[2], tuple) else sample[2] is not None
            yield sample
    except (OSError, ValueError) as err:  # an unreadable file or object: what came before is kept
        reading.damage = reading.damage or f"unreadable after {reading.kept} samples ({type(err).__name__}: {err})"
        _lose_the_rest(shards, reading, fs, inner)


def _lose_the_rest(shards: ShardSet, reading: ShardReading, fs, inner: str) -> None:
    """Count what the damage cost: the metadata's count minus what was read, else at least one sample."""
    if reading.expected is None:
        reading.expected = metadata_count(shards, fs, inner)
    seen = reading.kept + reading.lost_total
    reading.lose(DAMAGED, reading.damage or "damaged", max(1, (reading.expected or 0) - seen))


def metadata_count(shards: ShardSet, fs, inner: str) -> int | None:
    """Samples the shard's metadata claims: a Parquet footer, img2dataset's `_stats.json` `successes`."""
    import pyarrow.parquet as pq  # lazy: `qformer config` imports the builders, which import this module

    try:
        if shards.format == "parquet":
            with fs.open_input_file(inner) as f:
                return int(pq.ParquetFile(f).metadata.num_rows)
        if shards.format == "wds":
            with fs.open_input_stream(inner[: -len(".tar")] + "_stats.json") as f:
                return int(json.loads(f.read())["successes"])
    except (OSError, KeyError, ValueError, TypeError):
        return None
    return None


# ---- WebDataset ------------------------------------------------------------------------------------------
def _split_name(name: str) -> tuple[str, str]:
    """('dir/key', 'ext') as WebDataset groups members: the extension starts at the base name's first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


class _Samples:
    """Tar members -> samples, grouped by key whatever the member order."""

    def __init__(self, shards: ShardSet, path: str, reading: ShardReading, captionless: bool = False) -> None:
        self.path, self.reading, self.captionless = path, reading, captionless
        self.image_exts = (shards.image_key.lower(),) if shards.image_key else WDS_IMAGE_EXTS
        self.text_key = shards.text_key.lower()
        self.open: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self.done: set[str] = set()
        self.last: str | None = None  # the key of the previous member

    def caption(self, members: dict[str, bytes]) -> str | tuple[str, ...] | None:
        meta = members.get("json")
        listed = _json_field(meta, CAPTIONS_KEY) if meta is not None and b'"captions"' in meta else None
        caption = (captions_of(listed) if listed else None) or caption_text(members.get(self.text_key))
        if caption is None and meta is not None:
            caption = caption_text(_json_field(meta, "caption"))
        return caption

    def image(self, members: dict[str, bytes]) -> bytes | None:
        return next((members[e] for e in self.image_exts if e in members), None)

    def add(self, name: str, data: bytes) -> Iterator[tuple[str, bytes | None, Caption]]:
        key, ext = _split_name(name)
        if not ext or key.rpartition("/")[2].startswith("__"):
            return  # not part of a sample (a folder note, a `__key__` of other tools)
        if key in self.done:
            self.reading.note(f"{name}: member after its sample was read (ignored)")
            return
        members = self.open.setdefault(key, {})
        if ext in members:
            self.reading.note(f"{name}: duplicated member (the first is kept)")
            return
        members[ext] = data
        if key != self.last:  # another key began: finished samples go on
            self.last = key
            for other in [k for k in self.open if k != key]:
                if self.image(self.open[other]) is not None and (self.captionless or
                                                                 self.caption(self.open[other]) is not None):
                    yield from self.settle(other)
        while len(self.open) > MAX_INCOMPLETE:
            yield from self.settle(next(iter(self.open)))

    def settle(self, key: str, cut: bool = False) -> Iterator[tuple[str, bytes | None, Caption]]:
        members = self.open.pop(key)
        self.done.add(key)
        name = f"{self.path}#{key}"
        image, caption = self.image(members), self.caption(members)
        if cut and (image is None or caption is None):
            return  # the sample the damage cut: counted with the damage
        if caption is None and not (self.captionless and image is not None):
            self.reading.lose(NO_CAPTION, f"{name}: empty or non-text caption ({self.text_key})")
        elif image is None:
            self.reading.lose(NO_IMAGE, f"{name}: no image member ({', '.join(self.image_exts)})")
        else:
            yield name, image, caption

    def finish(self, cut: bool = False) -> Iterator[tuple[str, bytes | None, Caption]]:
        for key in list(self.open):
            yield from self.settle(key, cut)


def _json_field(data: bytes, key: str):
    try:
        meta = json.loads(data)
    except ValueError:
        return None
    return meta.get(key) if isinstance(meta, dict) else None


def _wds(shards: ShardSet, path: str, fs, inner: str, reading: ShardReading, captionless: bool = False):
    samples = _Samples(shards, path, reading, captionless)
    with fs.open_input_stream(inner) as stream:
        try:
            for name, data in tar_members(stream):
                yield from samples.add(name, data)
        except TarDamage as err:
            yield from samples.finish(cut=True)
            reading.damage = f"{err}; the {reading.kept} samples before it are kept"
            _lose_the_rest(shards, reading, fs, inner)
            return
    yield from samples.finish()


# ---- manifests and Parquet -------------------------------------------------------------------------------
def _record(shards: ShardSet, name: str, record: dict, reading: ShardReading, captionless: bool = False):
    """A manifest or Parquet record -> sample, or None (counted)."""
    caption = captions_of(record.get(CAPTIONS_KEY)) or captions_of(record.get(shards.text_key))
    if caption is None and not captionless:
        reading.lose(NO_CAPTION, f"{name}: empty or non-text caption ({shards.text_key})")
        return None
    value = record.get(shards.image_key)
    if isinstance(value, (bytes, bytearray)) and value:
        return name, bytes(value), caption
    if isinstance(value, str) and value:
        return (join(shards.image_root, value) if shards.image_root else value), None, caption
    reading.lose(NO_IMAGE, f"{name}: no image in column '{shards.image_key}'")
    return None


def _jsonl(shards: ShardSet, path: str, fs, inner: str, reading: ShardReading, captionless: bool = False):
    with fs.open_input_stream(inner) as f:
        data = f.read()  # a manifest holds paths and captions: small beside the images it names
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            reading.lose(MALFORMED, f"line {number}: not JSON ({err})")
            continue
        if not isinstance(record, dict):
            reading.lose(MALFORMED, f"line {number}: not a JSON object")
            continue
        sample = _record(shards, f"{path}#line {number}", record, reading, captionless)
        if sample:
            yield sample


def _csv(shards: ShardSet, path: str, fs, inner: str, reading: ShardReading, captionless: bool = False):
    with fs.open_input_stream(inner) as f:
        text = f.read().decode("utf-8", "replace")
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if header is None:
        return
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as err:
            reading.lose(MALFORMED, f"line {rows.line_num}: {err}")
            continue
        if not row:
            continue
        if len(row) != len(header):
            reading.lose(MALFORMED, f"line {rows.line_num}: {len(row)} fields, the header has {len(header)}")
            continue
        sample = _record(shards, f"{path}#line {rows.line_num}", dict(zip(header, row)), reading, captionless)
        if sample:
            yield sample


def _parquet(shards: ShardSet, path: str, fs, inner: str, reading: ShardReading, captionless: bool = False):
    import pyarrow.parquet as pq  # lazy: see metadata_count

    with fs.open_input_file(inner) as f:
        parquet = pq.ParquetFile(f)
        reading.expected = int(parquet.metadata.num_rows)
        columns = [c for c in (shards.text_key, CAPTIONS_KEY, shards.image_key, "key") if c in parquet.schema_arrow.names]
        row = 0
        for group in range(parquet.num_row_groups):  # one at a time: a damaged group costs its own rows
            rows, read = parquet.metadata.row_group(group).num_rows, 0
            try:
                for batch in parquet.iter_batches(batch_size=256, row_groups=[group], columns=columns):
                    for record in batch.to_pylist():
                        read += 1
                        sample = _record(shards, f"{path}#{record.get('key', row + read - 1)}", record, reading,
                                         captionless)
                        if sample:
                            yield sample
            except (OSError, ValueError) as err:
                reading.damage = f"row group {group} unreadable after {read} of its {rows} rows ({type(err).__name__}: {err})"
                reading.lose(DAMAGED, reading.damage, max(1, rows - read))
            row += rows
