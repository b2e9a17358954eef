"""Web image-text pairs (a url + caption list) into shards in img2dataset's layout: `qformer data prepare`'s
per-shard work, with no Ray in it (qformer.jobs.prepare_job runs one shard per Ray task).

A shard is rows [i*shard_size, (i+1)*shard_size) of the list, so the same list always gives the same
shards and a re-run knows which are done. Output, as img2dataset writes it (so the platform's shard
reader, `qformer data check` and other tools read it):
- wds: `<i:05d>.tar` holding `<key>.jpg`, `<key>.txt` (caption), `<key>.json` (url, caption, status,
  sizes), plus `<i:05d>.parquet` with every row's metadata, the failed ones too;
- parquet: `<i:05d>.parquet` with the metadata columns, `caption`/`txt` and `jpg` (bytes), the rows that
  gave an image only (the stats count the rest);
- `<i:05d>_stats.json`: count, successes, failed_to_download, failed_to_resize, duration, status_dict.
Keys are img2dataset's: the shard number then the row's index in the shard, zero-padded.

The stats file is written last: a shard with one is complete; one without is written again from the start.
Bad rows (no URL, not http(s)), 404s, timeouts, answers that are not images are counted by reason in the
stats and the metadata parquet, never fatal.
"""
from __future__ import annotations

import io
import json
import math
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from qformer.data.storage import filesystem, join
from qformer.data.tar_stream import tar_bytes

USER_AGENT = "qformer-platform data prepare (img2dataset-compatible)"
META_SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                         ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
                         ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32())])


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def key_of(shard_id: int, index: int, shard_size: int) -> str:
    digits = max(1, math.ceil(math.log10(max(shard_size, 2))))
    return f"{shard_id:05d}{index:0{digits}d}"


def fetch_image(url: str | None, timeout: float, image_size: int) -> tuple[bytes | None, dict, str | None, str]:
    """(encoded image, sizes, error, which count it goes to) for one row."""
    from PIL import Image  # lazy: only shard tasks decode

    if not url or not str(url).startswith(("http://", "https://")):
        return None, {}, f"bad row: url {str(url)[:60]!r}", "failed_to_download"
    try:
        req = urllib.request.Request(str(url), headers={"User-Agent": USER_AGENT})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
    except urllib.error.HTTPError as err:
        return None, {}, f"HTTP Error {err.code}", "failed_to_download"
    except Exception as err:  # noqa: BLE001 - timeouts, refused, reset: all count, none stop the shard
        return None, {}, (str(err) or type(err).__name__)[:200], "failed_to_download"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            width, height = img.size
            sizes = {"original_width": width, "original_height": height, "width": width, "height": height}
            if image_size and min(width, height) > image_size:
                scale = image_size / min(width, height)
                out = img.convert("RGB").resize((round(width * scale), round(height * scale)), Image.BICUBIC)
                buf = io.BytesIO()
                out.save(buf, format="JPEG", quality=95)
                data, sizes["width"], sizes["height"] = buf.getvalue(), out.size[0], out.size[1]
            elif img.format != "JPEG":  # the shard reader takes any image; `.jpg` members should hold a JPEG
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="JPEG", quality=95)
                data = buf.getvalue()
    except Exception as err:  # noqa: BLE001 - not an image, truncated, unsupported: counted
        return None, {}, f"not an image: {str(err)[:150]}", "failed_to_resize"
    return data, sizes, None, "successes"


def _write_outputs(out: str, shard_id: int, fmt: str, rows: list[dict], images: list[bytes | None],
                   endpoint: str | None) -> None:
    fs, base = filesystem(out, endpoint)
    fs.create_dir(base, recursive=True)  # local folders must exist; a bucket prefix needs none (a no-op)
    name = f"{base.rstrip('/')}/{shard_name(shard_id)}"
    meta = pa.Table.from_pylist(rows, schema=META_SCHEMA)
    if fmt == "parquet":  # the pairs only (img2dataset keeps failed rows with a null image; training would count them)
        ok = [i for i, data in enumerate(images) if data is not None]
        table = meta.take(ok)
        table = table.append_column("txt", table.column("caption")).append_column(
            "jpg", pa.array([images[i] for i in ok], pa.binary()))
        with fs.open_output_stream(name + ".parquet") as f:
            pq.write_table(table, f)
        return
    members = ((f"{row['key']}.{ext}", payload) for row, data in zip(rows, images) if data is not None
               for ext, payload in (("jpg", data), ("txt", (row["caption"] or "").encode()),
                                    ("json", json.dumps(row).encode())))
    with fs.open_output_stream(name + ".tar") as f:
        f.write(tar_bytes(members))
    with fs.open_output_stream(name + ".parquet") as f:
        pq.write_table(meta, f)


def download_shard(shard_id: int, urls: list, captions: list, out: str, fmt: str = "wds", shard_size: int = 10000,
                   threads: int = 64, timeout: float = 10.0, image_size: int = 0, endpoint: str | None = None) -> dict:
    """Download one shard's rows and write its files (stats last); returns the stats."""
    start = time.time()
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(lambda u: fetch_image(u, timeout, image_size), urls))
    counts, status = Counter(), Counter()
    rows, images = [], []
    for i, (url, caption, (data, sizes, error, bucket)) in enumerate(zip(urls, captions, results)):
        counts[bucket] += 1
        if error:
            status[error] += 1
        rows.append({"key": key_of(shard_id, i, shard_size), "url": None if url is None else str(url),
                     "caption": None if caption is None else str(caption),
                     "status": "success" if data is not None else "failed_to_download"
                     if bucket == "failed_to_download" else "failed_to_resize",
                     "error_message": error, **{k: sizes.get(k) for k in ("width", "height", "original_width",
                                                                          "original_height")}})
        images.append(data)
    _write_outputs(out, shard_id, fmt, rows, images, endpoint)
    end = time.time()
    stats = {"count": len(urls), "successes": counts["successes"], "failed_to_download": counts["failed_to_download"],
             "failed_to_resize": counts["failed_to_resize"], "duration": end - start, "start_time": start,
             "end_time": end, "status_dict": dict(status.most_common())}
    fs, base = filesystem(join(out, f"{shard_name(shard_id)}_stats.json"), endpoint)
    with fs.open_output_stream(base) as f:
        f.write(json.dumps(stats, indent=4).encode())
    return stats


def read_url_list(path: str, url_col: str = "url", caption_col: str = "caption",
                  endpoint: str | None = None) -> tuple[list, list, int]:
    """(urls, captions, unreadable rows) from a TSV/CSV/Parquet/JSONL list (by suffix; other suffixes are
    tab-separated, with a header row). A CSV/TSV line with the wrong number of fields is skipped and counted."""
    import pyarrow.csv as pacsv  # lazy: only the driver reads the list
    import pyarrow.json as pajson

    fs, inner = filesystem(path, endpoint)
    lower, unreadable = path.lower(), [0]

    def skip(row) -> str:
        unreadable[0] += 1
        return "skip"

    with fs.open_input_file(inner) as f:
        if lower.endswith(".parquet"):
            table = pq.read_table(f)
        elif lower.endswith((".jsonl", ".json")):
            table = pajson.read_json(f)
        else:
            delimiter = "," if lower.endswith(".csv") else "\t"
            table = pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter=delimiter,
                                                                       invalid_row_handler=skip),
                                   convert_options=pacsv.ConvertOptions(column_types={url_col: pa.string(),
                                                                                      caption_col: pa.string()}))
    for col in (url_col, caption_col):
        if col not in table.column_names:
            raise ValueError(f"{path}: no column {col!r} (columns: {', '.join(table.column_names)}); "
                             f"name it with --url-col / --caption-col")
    return table.column(url_col).to_pylist(), table.column(caption_col).to_pylist(), unreadable[0]
