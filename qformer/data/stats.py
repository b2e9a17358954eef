"""The skipped-image counter: a named Ray actor that the decode UDFs increment.

Decoding runs in Ray Data worker processes, training in Ray Train workers, so the count lives in
one small actor (0 CPUs) that both can find by name in the job's namespace. The training loop
calls `skipped_count()` at log steps (cheap: one actor call) and logs it as `skipped_images`.
Without Ray, or before any image was skipped, there is no actor and the count is 0.
One counter per Ray job: concurrent runs in the same job (Tune trials) share it. The job's driver owns
it, so it ends with the job (a detached counter outlived every eval and failed job on a long-lived head).
Ray is imported inside the functions: the decode transform imports this module, and `qformer config`
imports the transform (builders -> retrieval) without Ray.
"""
from __future__ import annotations

import logging

COUNTER_NAME = "qformer_skipped_images"
log = logging.getLogger("qformer.data")

_local_count = 0  # used when Ray is not running (single-process iteration)
_owned = None  # the handle that keeps the counter this process created alive


def _actor_class():
    import ray  # lazy: see the module docstring

    @ray.remote(num_cpus=0)
    class SkippedCounter:
        def __init__(self) -> None:
            self.count = 0
            self.examples: list[str] = []

        def add(self, n: int, examples: list[str]) -> int:
            self.count += n
            self.examples = (self.examples + examples)[-20:]
            return self.count

        def get(self) -> int:
            return self.count

        def recent(self) -> list[str]:
            return list(self.examples)

        def reset(self) -> None:
            self.count, self.examples = 0, []

    return SkippedCounter


def _get_actor(create: bool):
    import ray  # lazy: see the module docstring

    if not ray.is_initialized():
        return None
    try:
        return ray.get_actor(COUNTER_NAME)
    except ValueError:
        if not create:
            return None
    # Never detached: an actor is owned by the process that creates it and dies with it, so no counter
    # outlives its job on a long-lived cluster. Drivers create it up front (start_counter); a decode
    # worker creates it only when no driver did, and then the count lives as long as that worker.
    # The creator keeps a handle: Ray collects a non-detached actor, named or not, once its owner
    # holds none (which is how the old code lost the count and fell back to a leaked detached one).
    global _owned
    try:
        _owned = _actor_class().options(name=COUNTER_NAME, get_if_exists=True).remote()
        return _owned
    except ValueError:  # another process created it between our lookup and creation
        return ray.get_actor(COUNTER_NAME)


def start_counter():
    """On the driver, before training, evaluating or a sweep: create the counter (owned by this process,
    so it ends with the job, and Tune trials of the job share it) and zero it. Returns the handle."""
    global _local_count
    _local_count = 0
    actor = _get_actor(create=True)
    if actor is not None:
        import ray  # lazy: see the module docstring

        ray.get(actor.reset.remote())
    return actor


def record_skipped(reasons: list[str]) -> None:
    """Called by the decode UDFs with one message (path: reason) per skipped image."""
    global _local_count
    if not reasons:
        return
    for reason in reasons:
        log.warning("skipping image %s", reason)
    _local_count += len(reasons)
    actor = _get_actor(create=True)
    if actor is not None:
        import ray  # lazy: see the module docstring

        # wait for it (skips are rare): the count is exact by the time the batch is consumed
        ray.get(actor.add.remote(len(reasons), reasons))


def skipped_count() -> int:
    """Images skipped so far in this Ray job (0 when none, or without Ray: this process's count)."""
    import ray  # lazy: see the module docstring

    actor = _get_actor(create=False)
    if actor is None:
        return _local_count
    return int(ray.get(actor.get.remote()))


def recent_skipped() -> list[str]:
    """The last (up to 20) 'path: reason' messages, for logs and the data check."""
    import ray  # lazy: see the module docstring

    actor = _get_actor(create=False)
    return [] if actor is None else list(ray.get(actor.recent.remote()))


def reset_skipped() -> None:
    """Zero the counter (build_train_datasets calls it so a run starts at 0)."""
    global _local_count
    _local_count = 0
    actor = _get_actor(create=False)
    if actor is not None:
        import ray  # lazy: see the module docstring

        ray.get(actor.reset.remote())
