"""The lost-sample ledger: a named Ray actor that the read tasks and decode UDFs report to.

Reading runs in Ray Data worker processes, training in Ray Train workers, so the ledger lives in one
small actor (0 CPUs) that both find by name in the job's namespace. The training loop reads it at log
steps (one actor call) and logs `skipped_images` (and `skipped_images/<reason>`, qformer.data.shard_records
names the reasons).

Training losses are kept per read unit (the chunk's augmentation seed and unit id, unique in a run):
a unit read again (a restart re-reads what the last checkpoint had not trained, a resumed run re-reads
the pass) reports the same losses under the same key, so nothing is counted twice. The checkpoint keeps
the ledger (`state()`, in its data position) and a resumed run restores it (`restore`), so the count is
the run's, across restarts and resumes, and ends equal to what the epochs lost. Losses without a unit
(evaluation reads) are added up apart and never checkpointed.
Without Ray there is no actor and this process keeps the ledger. One ledger per Ray job: concurrent runs in
the same job (Tune trials) share it. The job's driver owns it, so it ends with the job (a detached counter
outlived every eval and failed job on a long-lived head).
Ray is imported inside the functions: the decode transform imports this module, and `qformer config`
imports the transform (builders -> retrieval) without Ray.
"""
from __future__ import annotations

import logging

COUNTER_NAME = "qformer_skipped_images"
# why a sample is lost (qformer.data.shard_records finds all but the last); logged as skipped_images/<reason>
NO_CAPTION, NO_IMAGE, MALFORMED, DAMAGED, UNDECODABLE = "no_caption", "no_image", "malformed", "damaged_shard", "undecodable"
LEDGER_KEY = "lost_samples"  # where a checkpoint's data position keeps the ledger (no stream has this name)
log = logging.getLogger("qformer.data")


class LossLedger:
    """unit key -> {reason: samples lost}; losses without a unit by reason. (The messages are in the logs.)"""

    def __init__(self) -> None:
        self.units: dict[str, dict[str, int]] = {}
        self.loose: dict[str, int] = {}

    def add(self, by_reason: dict[str, int], unit: str | None = None) -> None:
        if unit is None:
            for reason, n in by_reason.items():
                self.loose[reason] = self.loose.get(reason, 0) + int(n)
        else:  # a unit read again reports the same losses: set, not add
            self.units.setdefault(unit, {}).update({r: int(n) for r, n in by_reason.items()})

    def training(self) -> dict[str, int]:
        """Losses of the training reads, by reason."""
        out: dict[str, int] = {}
        for losses in self.units.values():
            for reason, n in losses.items():
                out[reason] = out.get(reason, 0) + n
        return out

    def total(self) -> int:
        return sum(self.training().values()) + sum(self.loose.values())

    def state(self) -> dict[str, dict[str, int]]:
        return {unit: dict(losses) for unit, losses in self.units.items()}

    def restore(self, state: dict | None) -> None:
        for unit, losses in (state or {}).items():
            self.units.setdefault(str(unit), {}).update({r: int(n) for r, n in losses.items()})

    def reset(self) -> None:
        self.__init__()


_local = LossLedger()  # used when Ray is not running (single-process iteration)
_owned = None  # the handle that keeps the ledger this process created alive


def _actor_class():
    import ray  # lazy: see the module docstring

    return ray.remote(num_cpus=0)(LossLedger)


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
    """On the driver, before training, evaluating or a sweep: create the ledger (owned by this process, so it
    ends with the job, and Tune trials of the job share it) and empty it. Returns the handle."""
    _local.reset()
    actor = _get_actor(create=True)
    if actor is not None:
        import ray  # lazy: see the module docstring

        ray.get(actor.reset.remote())
    return actor


def _call(method: str, *args):
    """`method` on the job's ledger (created by the writers when missing), else on this process's. A ledger
    whose node died is replaced (see _replace_dead); its count comes back with the next restart's restore."""
    create = method in ("add", "restore")
    actor = _get_actor(create)
    if actor is None:
        return getattr(_local, method)(*args)
    import ray  # lazy: see the module docstring

    try:  # waited for (losses are rare): the count is exact by the time the batch is consumed
        return ray.get(getattr(actor, method).remote(*args))
    except ray.exceptions.RayActorError:
        _replace_dead(actor)
        actor = _get_actor(create)
        if actor is None:
            return getattr(_local, method)(*args)
        return ray.get(getattr(actor, method).remote(*args))


def _replace_dead(actor) -> None:
    """The ledger died with its node (a lost worker node held it). Its name stays bound to the dead actor while
    the owner lives, so lookups keep finding it: killing it frees the name, and the next writer (or the
    restarted rank 0, restoring the checkpoint's count) creates a new ledger under it."""
    import ray  # lazy: see the module docstring

    global _owned
    log.warning("the lost-sample ledger died with its node: starting a new one (the restart restores its count "
                "from the checkpoint)")
    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - already gone: the name is free
        pass
    if _owned is not None and _owned._actor_id == actor._actor_id:
        _owned = None


def record_skipped(reasons: list[str], reason: str = UNDECODABLE, unit: str | None = None) -> None:
    """Called by the decode UDFs with one message (path: why) per image that did not decode."""
    if reasons:
        for message in reasons:
            log.warning("skipping image %s", message)
        record_losses({reason: len(reasons)}, unit)


def record_losses(by_reason: dict[str, int], unit: str | None = None) -> None:
    """Count lost samples by reason (the names above); `unit`: the read unit's key
    (qformer.data.position.unit_key), so that reading it again does not count them again."""
    if by_reason:
        _call("add", {r: int(n) for r, n in by_reason.items()}, unit)


def skipped_count() -> int:
    """Samples lost so far in this Ray job, training and evaluation (0 when none)."""
    return int(_call("total"))


def training_losses() -> dict[str, int]:
    """The training reads' lost samples by reason, for the run (restored across resumes)."""
    return dict(_call("training"))


def ledger_state() -> dict:
    """What a checkpoint keeps of the training losses."""
    return _call("state")


def restore_ledger(state: dict | None) -> None:
    """A resumed or restarted run's losses so far (from its checkpoint), merged into the job's ledger."""
    if state:
        _call("restore", state)
