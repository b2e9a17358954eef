"""`qformer data prepare`: a web url + caption list (CC3M, CC12M, SBU, LAION) into image-text shards in
img2dataset's layout, on the Ray cluster the platform runs on, resumable.

Two engines write the same layout:
- `ray` (default): the driver reads the list and cuts it into shards of `shard_size` rows; each shard
  whose `_stats.json` is not there yet is one Ray task (qformer.data.web_shards.download_shard: `threads`
  downloads in flight, images checked by decoding, optional resize, tar + parquet + stats). A re-run
  skips the shards that have stats: an interrupted preparation continues where it stopped.
- `img2dataset`: img2dataset itself (`pip install 'qformer-platform[prepare]'`), with its Ray distributor
  when a cluster is attached (else its multiprocessing one) and its incremental mode (same resume rule).
Either way the command ends with totals and the `datasets:` entry to paste into a config.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from qformer.core.errors import ConfigError
from qformer.core.logs import get_logger
from qformer.data.storage import expand, filesystem, is_uri, join

log = get_logger(__name__)
FORMAT_SUFFIX = {"wds": "tar", "parquet": "parquet"}


@dataclass
class PrepareResult:
    out: str
    fmt: str
    shards: int
    skipped_shards: int  # already complete before this run
    stats: dict  # summed over every shard (this run's and earlier ones')
    unreadable_rows: int

    def entry(self, name: str = "web") -> str:
        last = f"{self.shards - 1:05d}"
        storage = join(self.out, f"{{00000..{last}}}.{FORMAT_SUFFIX[self.fmt]}") if self.shards > 1 else \
            join(self.out, f"00000.{FORMAT_SUFFIX[self.fmt]}")
        return (f"datasets:\n  {name}:\n    builder: image_text_shards\n    build_info:\n      storage: {storage}\n"
                f"      format: {self.fmt}\n      num_samples: {self.stats.get('successes', 0)}")

    def summary(self) -> str:
        s = self.stats
        lines = [f"data prepare into {self.out}: {self.shards} shards ({self.skipped_shards} complete before this run), "
                 f"{s.get('successes', 0)} of {s.get('count', 0)} rows written, {s.get('failed_to_download', 0)} "
                 f"failed to download, {s.get('failed_to_resize', 0)} not images"]
        if self.unreadable_rows:
            lines.append(f"{self.unreadable_rows} lines of the list could not be read (wrong field count): skipped")
        for reason, n in sorted(s.get("status_dict", {}).items(), key=lambda kv: -kv[1])[:8]:
            lines.append(f"  {n:8d}  {reason}")
        return "\n".join(lines)


def _stats_done(out: str, endpoint: str | None) -> dict[int, dict]:
    """{shard number: its stats} for every shard that has a `_stats.json` under `out`."""
    done = {}
    for path in expand(join(out, "*_stats.json"), endpoint):
        stem = path.rsplit("/", 1)[-1][: -len("_stats.json")]
        if stem.isdigit():
            fs, inner = filesystem(path, endpoint)
            with fs.open_input_stream(inner) as f:
                done[int(stem)] = json.loads(f.read())
    return done


def _sum(stats: list[dict]) -> dict:
    total: dict = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0, "status_dict": {}}
    for s in stats:
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            total[key] += int(s.get(key, 0))
        for reason, n in (s.get("status_dict") or {}).items():
            total["status_dict"][reason] = total["status_dict"].get(reason, 0) + n
    return total


def _connect() -> None:
    import ray  # lazy: the command's module is imported by `qformer --help`

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)


def prepare(url_list: str, out: str, fmt: str = "wds", url_col: str = "url", caption_col: str = "caption",
            shard_size: int = 10000, threads: int = 64, timeout: float = 10.0, image_size: int = 0,
            endpoint: str | None = None) -> PrepareResult:
    """The `ray` engine (see the module docstring)."""
    import ray  # lazy: as above

    from qformer.core.progress import Progress
    from qformer.data.web_shards import download_shard, read_url_list

    if fmt not in FORMAT_SUFFIX:
        raise ConfigError(f"format must be one of {', '.join(FORMAT_SUFFIX)}, got {fmt!r}", "--format")
    out = out if is_uri(out) else os.path.abspath(os.path.expanduser(out))
    if not is_uri(out):
        os.makedirs(out, exist_ok=True)
    try:
        urls, captions, unreadable = read_url_list(url_list, url_col, caption_col, endpoint)
    except (OSError, ValueError) as err:
        raise ConfigError(str(err).splitlines()[0], "--url-list") from None
    shards = max(1, math.ceil(len(urls) / shard_size))
    done = _stats_done(out, endpoint)
    todo = [i for i in range(shards) if i not in done]
    log.info("data prepare: %d rows -> %d shards of %d (%d already complete) into %s", len(urls), shards, shard_size,
             len(done), out)
    _connect()
    task = ray.remote(num_cpus=1, max_retries=2)(download_shard)
    refs = [task.remote(i, urls[i * shard_size:(i + 1) * shard_size], captions[i * shard_size:(i + 1) * shard_size],
                        out, fmt, shard_size, threads, timeout, image_size, endpoint) for i in todo]
    new = {}
    with Progress(len(refs), "data prepare", unit="shards", log_every_s=10) as progress:
        pending = dict(zip(refs, todo))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            new[pending.pop(ready[0])] = ray.get(ready[0])
            progress.update(1)
    return PrepareResult(out, fmt, shards, len(done), _sum(list({**done, **new}.values())), unreadable)


def prepare_with_img2dataset(url_list: str, out: str, fmt: str = "wds", url_col: str = "url",
                             caption_col: str = "caption", shard_size: int = 10000, threads: int = 64,
                             timeout: float = 10.0, image_size: int = 0, processes: int | None = None) -> PrepareResult:
    """The `img2dataset` engine: its Ray distributor when a cluster is attached, else multiprocessing."""
    try:
        from img2dataset import download  # lazy: optional extra `prepare`
    except ImportError:
        raise ConfigError("img2dataset is not installed: pip install 'qformer-platform[prepare]', or use "
                          "--engine ray", "--engine") from None
    suffix = url_list.lower().rsplit(".", 1)[-1]
    input_format = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl", "json": "json"}.get(suffix, "tsv")
    distributor = "ray" if os.environ.get("RAY_ADDRESS") else "multiprocessing"
    if distributor == "ray":
        _connect()
    download(url_list=url_list, output_folder=out, output_format="webdataset" if fmt == "wds" else "parquet",
             input_format=input_format, url_col=url_col, caption_col=caption_col, number_sample_per_shard=shard_size,
             thread_count=threads, timeout=int(math.ceil(timeout)), processes_count=processes or os.cpu_count() or 1,
             resize_mode="no" if not image_size else "keep_ratio", image_size=image_size or 256,
             resize_only_if_bigger=True, distributor=distributor, incremental_mode="incremental", enable_wandb=False)
    done = _stats_done(out, None)
    return PrepareResult(out, fmt, len(done), 0, _sum(list(done.values())), 0)


def prepare_command(args) -> int:
    kwargs = dict(fmt=args.format, url_col=args.url_col, caption_col=args.caption_col, shard_size=args.shard_size,
                  threads=args.threads, timeout=args.timeout, image_size=args.image_size)
    if args.engine == "img2dataset":
        result = prepare_with_img2dataset(args.url_list, args.out, **kwargs)
    else:
        result = prepare(args.url_list, args.out, **kwargs)
    print(result.summary())
    print("\nPaste into your config (then `qformer data check --cfg-path ...`):\n" + result.entry())
    return 0 if result.stats.get("successes") else 1
