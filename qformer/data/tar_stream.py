"""Members of a tar file, streamed, with damage reported where it is instead of hidden.

The standard library's streaming mode (`tarfile.open(mode="r|")`) ends iteration silently at an invalid
header after the first member, so a shard with garbage in the middle would look complete. This reads
the 512-byte blocks itself (headers are still parsed and checksummed by `tarfile.TarInfo.frombuf`),
follows GNU long names and pax `path`/`size` records, yields every regular file whole, and raises
`TarDamage` with the byte offset at the first header that does not parse or the first member the file
ends inside. What was yielded before stays good: a reader keeps it.
"""
from __future__ import annotations

import io
import tarfile
from typing import BinaryIO, Iterable, Iterator

BLOCK = 512
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


class TarDamage(Exception):
    def __init__(self, offset: int, why: str) -> None:
        super().__init__(f"damaged at byte {offset}: {why}")
        self.offset, self.why = offset, why


def _read(stream: BinaryIO, n: int) -> bytes:
    """Up to n bytes: fewer only at the end of the file (object-store streams may return short reads)."""
    parts, got = [], 0
    while got < n:
        part = stream.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _pax_records(data: bytes) -> dict[str, str]:
    """`<length> key=value\\n` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in order; raises TarDamage on an unparsable header or a cut."""
    offset, long_name, pax = 0, None, {}
    while True:
        header = _read(stream, BLOCK)
        if not header:  # every tar writer ends with zero blocks: without them the file was cut at a boundary
            raise TarDamage(offset, "the file ends without the end-of-archive blocks (cut between members)")
        if len(header) < BLOCK:
            raise TarDamage(offset, "the file ends inside a member header")
        if header.count(0) == BLOCK:
            return  # end of archive
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as err:
            raise TarDamage(offset, f"not a tar member header ({err})") from None
        size = int(pax.get("size", info.size)) if info.type not in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME) else info.size
        name = long_name or pax.get("path") or info.name
        data = _read(stream, size)
        if len(data) < size:
            raise TarDamage(offset, f"the file ends inside member {name} ({len(data)} of {size} bytes)")
        _read(stream, -size % BLOCK)  # padding; a cut inside it shows at the next header
        offset += BLOCK + size + (-size % BLOCK)
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if info.type == tarfile.XHDTYPE:
            pax = _pax_records(data)
            continue
        if info.type == tarfile.XGLTYPE:
            continue
        long_name, pax = None, {}
        if info.type in _FILE_TYPES:
            yield name, data


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A tar file holding `members` (name, data) in order, as bytes: how the shard writers build a shard."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
