"""The training loop's small components, without Ray: the audit files, the step hooks a test installs
(in process and by QFORMER_STEP_HOOKS), and local checkpoint pruning."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from step_hooks import FailOnceAtStep, InjectedFailure

from qformer.config.batch_plan import BatchPlan
from qformer.jobs.train_job import env_hooks
from qformer.train import checkpoint as ckpt_io
from qformer.train.audit import TrainingAudit
from qformer.train.checkpoint_reporter import prune_local
from qformer.train.loop_config import LoopConfig, call_hooks


def _batch(rows: list[list[int]]) -> dict:
    return {"text_ids": torch.tensor(rows), "image": torch.zeros(len(rows), 3, 2, 2, dtype=torch.uint8)}


def test_the_audit_records_each_rows_id_per_step_and_each_start(tmp_path):
    audit = TrainingAudit(str(tmp_path), rank=0, world=2)
    audit.record_start(ckpt_io.ResumePoint(epoch=1, iter_in_epoch=3, step=7), BatchPlan(2, 4, 1, 1, 1.0))
    audit.record_batch(8, _batch([[1, 2], [3, 4]]))
    audit.record_batch(9, _batch([[1, 2], [5, 6]]))
    rows = [json.loads(line) for line in (tmp_path / "rows-rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [8, 9]
    assert rows[0]["ids"][0] == rows[1]["ids"][0]  # the same caption has the same id in any step
    assert len(set(rows[0]["ids"] + rows[1]["ids"])) == 3
    start = json.loads((tmp_path / "starts.jsonl").read_text())
    assert (start["world"], start["step"], start["epoch"], start["worker_batch"]) == (2, 7, 1, 4)
    TrainingAudit(str(tmp_path), rank=1, world=2).record_start(ckpt_io.ResumePoint(0, 0, 0), BatchPlan(2, 4, 1, 1, 1.0))
    assert len((tmp_path / "starts.jsonl").read_text().splitlines()) == 1  # rank 0 records the group's start


def test_audit_dir_comes_from_the_run_config():
    assert LoopConfig(cfg={"run": {"data": {"audit_dir": "/a"}}}).audit_dir == "/a"
    assert LoopConfig(cfg={"run": {"data": {}}}).audit_dir is None


def test_a_fail_once_hook_fails_at_its_step_on_rank_0_only_once(tmp_path):
    hook = FailOnceAtStep(3, str(tmp_path / "marker"))
    call_hooks((hook,), 2, 0)
    call_hooks((hook,), 3, 1)  # other ranks go on
    with pytest.raises(InjectedFailure, match="injected failure at global step 3"):
        call_hooks((hook,), 3, 0)
    call_hooks((hook,), 3, 0)  # the restarted group passes the step
    assert pickle.loads(pickle.dumps(hook)) == hook  # travels to Ray workers


def test_hooks_named_in_the_environment_are_built_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.delenv("QFORMER_STEP_HOOKS", raising=False)
    assert env_hooks() == ()
    monkeypatch.setenv("QFORMER_STEP_HOOKS", "step_hooks:fail_once_from_env")
    monkeypatch.setenv("QFORMER_FAIL_ONCE_AT_STEP", "2")
    monkeypatch.setenv("QFORMER_FAIL_MARKER", str(tmp_path / "m"))
    assert env_hooks() == (FailOnceAtStep(2, str(tmp_path / "m")),)


def test_local_checkpoints_are_pruned_to_the_newest_by_step(tmp_path):
    for step in (10, 2, 30):
        d = tmp_path / f"ckpt-{step}"
        d.mkdir()
        (d / ckpt_io.META_FILE).write_text(json.dumps({"step": step}))
    (tmp_path / "partial").mkdir()  # no meta.json: not a checkpoint, left alone
    prune_local(tmp_path, keep=0)  # run.keep_checkpoints: 0 keeps all
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-10", "ckpt-2", "ckpt-30", "partial"]
    prune_local(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-10", "ckpt-30", "partial"]


def test_ray_train_s_whole_report_lines_are_quieted_on_the_workers_and_in_local_mode(caplog):
    """Each ray.train.report was logged by Ray Train at INFO as the whole report dict (issue 32's noise): on a
    worker by the execution context's logger, in Train local mode (the demo) by train_fn_utils's. The worker
    entry point raises both to WARNING. Fails when Ray moves either module (the lines would be back)."""
    import logging

    from ray.train.v2._internal.execution import context, train_fn_utils

    from qformer.train.worker import quiet_report_lines

    loggers = [logging.getLogger(context.__file__), logging.getLogger(train_fn_utils.__name__)]
    before = [logger.level for logger in loggers]
    try:
        quiet_report_lines()
        with caplog.at_level(logging.INFO):
            loggers[0].info("Reporting training result 1: TrainingReport(...)")
            loggers[1].info("Reported metrics: {'epoch': 0}")
        assert "Report" not in caplog.text and [logger.level for logger in loggers] == [logging.WARNING] * 2
    finally:
        for logger, level in zip(loggers, before):
            logger.setLevel(level)


class _Tracker:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log_metrics_buffered(self, metrics: dict, step: int) -> None:
        self.logged.append((step, metrics))


def test_each_worker_group_logs_its_world_once_at_its_first_step_also_a_step_logged_before():
    """A restart after a node loss re-runs the steps since its checkpoint and keeps its weights for them: its
    world goes to MLflow at its first step, though an earlier group logged that step (the later value counts),
    once, and the per-step metrics leave the world keys out."""
    from qformer.train.metric_logger import MetricLogger, WORLD_KEYS

    plan = BatchPlan(world=1, worker_batch=4, micro_per_step=2, accum_grad_iters=2, lr_scale=1.0)
    logger = MetricLogger(None, rank=0, world=1, plan=plan, outage_wait_s=0.0)
    logger.tracker, logger.logged_through = _Tracker(), 4
    logger.log_world(4)
    logger.log_world(5)
    assert logger.tracker.logged == [(4, {"world_size": 1.0, "global_batch": 8.0, "accum_grad_iters": 2.0,
                                          "worker_batch": 4.0})]
    assert tuple(logger.tracker.logged[0][1]) == WORLD_KEYS


def test_the_world_size_chart_is_a_png():
    from qformer.tracking.plots import world_size_png

    png = world_size_png([(s, 1.0 / s) for s in range(1, 9)], [(1, 2.0), (4, 1.0), (4, 2.0)], {"grow checkpoint": [6]})
    assert png.startswith(b"\x89PNG")
