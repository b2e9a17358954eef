"""The CapFilt batch-inference job on Ray Data, and its driver loop.

    shard indices -> read (CPU task per shard: samples in chunks of rows)
                  -> decode_batch (CPU tasks: decode, both models' resize/normalise)
                  -> Captioner (actor pool; a GPU share each when the cluster has GPUs, fp16)
                  -> Scorer (actor pool, same)
                  -> driver: rows grouped by shard; a shard whose rows are all back is written at once

Only shards whose output is not there yet are read, so a rerun of an interrupted job continues. Rows that
reach the driver carry the encoded image (the output holds it) but no pixels: the actors drop those.
Per GPU, by default, one captioner actor (0.75 GPU) and one scorer actor (0.25 GPU): sampling 10 captions of
30 tokens is most of the work, one CLIP forward per candidate the rest.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from qformer.core.errors import ConfigError
from qformer.core.logs import get_logger
from qformer.core.progress import Progress
from qformer.data.capfilt.ranking import Kept, ShardStats
from qformer.data.capfilt.shards import OutSample, output_name, read_rows, write_output, written
from qformer.data.capfilt.stages import (DEFAULT_CAPTIONER, DEFAULT_PROMPT, DEFAULT_SCORER, Captioner, Scorer,
                                         decode_batch, load_processor)
from qformer.data.shard_set import ShardSet

log = get_logger("data.capfilt")


@dataclass(frozen=True)
class CapfiltSpec:
    captioner: str = DEFAULT_CAPTIONER
    scorer: str = DEFAULT_SCORER
    num_captions: int = 10
    keep: int = 2
    top_p: float = 0.9
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    batch_size: int = 32  # images per decode task call and per actor call
    captioners: int | None = None  # actors (default: one per GPU, else 1)
    scorers: int | None = None
    actor_cpus: float = 1.0
    task_cpus: float = 1.0  # read and decode tasks

    def params(self) -> dict:
        return {k: getattr(self, k) for k in ("captioner", "scorer", "num_captions", "keep", "top_p", "prompt", "seed")}


@dataclass
class CapfiltRun:
    """What one run did: the shards it wrote (with their statistics) and those it found written already."""

    names: list[str]  # every input shard's output name
    skipped: list[str]
    stats: dict[str, ShardStats] = field(default_factory=dict)  # written by this run
    seconds: float = 0.0
    first_shard_s: float = 0.0  # until the first shard was written: start-up (actors load their models) and one shard

    @property
    def images(self) -> int:
        return sum(s.samples for s in self.stats.values())


def output_names(shards: ShardSet) -> list[str]:
    names = [output_name(p, shards.format) for p in shards.shards]
    seen: dict[str, str] = {}
    for path, name in zip(shards.shards, names):
        if name in seen:
            raise ConfigError(f"two input shards would write the same output {name} ({seen[name]}, {path}); "
                              "run them into separate --out folders", "--in")
        seen[name] = path
    return names


def layout(spec: CapfiltSpec, gpus: int) -> dict:
    """Actor counts and resources: per GPU one captioner (0.75 GPU) and one scorer (0.25 GPU); on CPU one each."""
    return {"captioners": spec.captioners or max(1, gpus), "scorers": spec.scorers or max(1, gpus),
            "captioner_gpus": 0.75 if gpus else 0, "scorer_gpus": 0.25 if gpus else 0}


def check_cpus(spec: CapfiltSpec, plan: dict) -> None:
    """Actors hold their CPUs for the whole job: with none left over, read and decode tasks never start."""
    import ray  # lazy: see capfilt_dataset

    cpus = float(ray.cluster_resources().get("CPU", 0))
    need = (plan["captioners"] + plan["scorers"]) * spec.actor_cpus + spec.task_cpus
    if need > cpus:
        raise ConfigError(f"{plan['captioners'] + plan['scorers']} actors of {spec.actor_cpus} CPUs and a decode task "
                          f"of {spec.task_cpus} need {need:g} CPUs, the cluster has {cpus:g}: lower --actor-cpus and "
                          "--task-cpus (or the actor counts)", "--actor-cpus")


def decode_memory(batch_size: int) -> int:
    """Bytes a decode task reserves: the worker with torch and the image processors imported (~520 MiB), and per
    image a decoded photo and both models' float pixels (384 and 224 px), twice (the batch and its stacked
    copy). A reservation the actors do not make also keeps Ray Data from fusing the decode into the captioner
    actors (it fuses maps whose resource requests are equal)."""
    return 576 * 1024**2 + int(batch_size) * 8 * 1024**2


def capfilt_dataset(shards: ShardSet, todo: list[int], spec: CapfiltSpec, processors: tuple, plan: dict):
    import ray.data  # lazy: the command module imports this package for its defaults

    ds = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=max(1, len(todo)))
    ds = ds.map_batches(read_rows, fn_kwargs={"shards": shards, "seed": spec.seed}, batch_size=1,
                        num_cpus=spec.task_cpus, batch_format="numpy")
    ds = ds.map_batches(decode_batch, fn_kwargs={"captioner_images": processors[0].image_processor,
                                                 "scorer_images": processors[1].image_processor},
                        batch_size=spec.batch_size, num_cpus=spec.task_cpus, memory=decode_memory(spec.batch_size),
                        batch_format="numpy")
    ds = ds.map_batches(Captioner, fn_constructor_kwargs={"name": spec.captioner, "num_captions": spec.num_captions,
                                                          "top_p": spec.top_p, "prompt": spec.prompt},
                        batch_size=spec.batch_size, compute=ray.data.ActorPoolStrategy(size=plan["captioners"]),
                        num_gpus=plan["captioner_gpus"], num_cpus=spec.actor_cpus, batch_format="numpy")
    return ds.map_batches(Scorer, fn_constructor_kwargs={"name": spec.scorer, "keep": spec.keep},
                          batch_size=spec.batch_size, compute=ray.data.ActorPoolStrategy(size=plan["scorers"]),
                          num_gpus=plan["scorer_gpus"], num_cpus=spec.actor_cpus, batch_format="numpy")


class ShardRows:
    """One shard's rows as they come back, in any order."""

    def __init__(self) -> None:
        self.rows: dict[int, OutSample] = {}
        self.total, self.lost = -1, {}

    def add(self, batch: dict, i: int) -> bool:
        """Take row i of `batch`; True when the shard is complete."""
        if int(batch["total"][i]) >= 0:
            self.total, self.lost = int(batch["total"][i]), json.loads(str(batch["lost"][i]))
        index = int(batch["index"][i])
        if index >= 0:
            kept = str(batch["kept"][i])
            self.rows[index] = OutSample(str(batch["name"][i]), bytes(batch["data"][i]),
                                         json.loads(str(batch["originals"][i])), Kept.from_json(kept) if kept else None)
        return self.total >= 0 and len(self.rows) == self.total

    def samples_and_stats(self) -> tuple[list[OutSample], ShardStats]:
        samples = [self.rows[i] for i in range(self.total)]
        stats = ShardStats()
        stats.lost.update(self.lost)
        for s in samples:
            stats.count(s.kept, bool(s.originals))
        return samples, stats


def load_processors(spec: CapfiltSpec) -> tuple:
    """Both models' processors: loading them is the check that the models can be loaded here at all."""
    return load_processor(spec.captioner, "captioner"), load_processor(spec.scorer, "scorer")


def run_capfilt(shards: ShardSet, out_dir: str, spec: CapfiltSpec, gpus: int = 0,
                processors: tuple | None = None) -> CapfiltRun:
    """Caption, rank and write every input shard not yet written under `out_dir` (needs a connected Ray)."""
    names = output_names(shards)
    done = written(out_dir, names, shards.endpoint)
    run = CapfiltRun(names, [n for n in names if n in done])
    todo = [i for i, n in enumerate(names) if n not in done]
    processors = processors or load_processors(spec)
    if not todo:
        log.info("capfilt: all %d shards are written in %s already", len(names), out_dir)
        return run
    plan = layout(spec, gpus)
    check_cpus(spec, plan)
    log.info("capfilt: %d of %d shards to write (%d written already); %d captioner and %d scorer actors",
             len(todo), len(names), len(run.skipped), plan["captioners"], plan["scorers"])
    start = time.monotonic()
    pending: dict[int, ShardRows] = {}
    ds = capfilt_dataset(shards, todo, spec, processors, plan)
    with Progress(None, f"capfilt (0/{len(todo)} shards)", "images") as progress:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["shard"])):
                shard = int(batch["shard"][i])
                rows = pending.setdefault(shard, ShardRows())
                progress.update(int(batch["index"][i]) >= 0)
                if rows.add(batch, i):
                    samples, stats = pending.pop(shard).samples_and_stats()
                    write_output(out_dir, names[shard], shards.format, samples, stats, shards.endpoint)
                    run.stats[names[shard]] = stats
                    run.first_shard_s = run.first_shard_s or time.monotonic() - start
                    n = len(run.stats)
                    estimate = round(progress.n / n * len(todo)) if n < len(todo) else progress.n
                    progress.set_total(estimate, f"capfilt ({n}/{len(todo)} shards)")
    if pending:  # every row of a read shard comes back; a shard left here is a bug, not bad data
        raise RuntimeError(f"capfilt: rows of {len(pending)} shards did not all come back")
    run.seconds = time.monotonic() - start
    return run
