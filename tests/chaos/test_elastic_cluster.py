"""Elastic training on a simulated multi-node cluster (ray.cluster_utils.Cluster, in a subprocess: a
Cluster cannot share this process with the session's Ray): a node lost mid-epoch, the node back, SIGTERM
to a worker. The scenario is qformer.bench.elastic's `resize`; these assertions are the promises."""
from __future__ import annotations

import pytest
from chaos_helpers import ChaosRow

pytestmark = [pytest.mark.chaos, pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def resize(tiny_bert, tmp_path_factory):
    from qformer.bench.elastic import run_scenario

    return run_scenario("resize", {"model": {"bert_model": tiny_bert}}, timeout_s=600,
                        work_root=str(tmp_path_factory.mktemp("elastic")))


def _value_at(history: list, step: int) -> float:
    """A series read as a step function: the value logged last at the latest step not after `step`."""
    return dict(history)[max(s for s, _ in history if s <= step)]


def _kept_world(starts: list[dict], step: int) -> int:
    """The world of the group whose weights for `step` were kept: the last one that resumed before it."""
    return [s for s in starts if s["step"] < step][-1]["world"]


def test_node_loss_shrinks_keeps_the_global_batch_and_the_node_return_grows_at_a_step_boundary(resize, chaos_report):
    assert resize["error"] is None, resize["error"]
    starts = resize["starts"]
    # first group on both nodes; after the node loss one worker; back to two when the node returns
    assert [s["world"] for s in starts[:3]] == [2, 1, 2]
    one = starts[1]
    assert (one["worker_batch"], one["micro_per_step"], one["accum_grad_iters"], one["global_batch"]) == (4, 2, 2, 8)
    assert all(s["global_batch"] == 8 for s in starts)
    # every restart resumed from a checkpoint written before it (the node left after step 3's registered)
    for event in resize["events"]:
        assert starts[event["starts_before"]]["step"] in resize["checkpoints"]
    assert one["step"] >= 3
    assert resize["steps_lost"]["node_removed"] <= 3  # save_freq_steps bounds what a node loss costs
    # the node's return: the ranks checkpointed at the step boundary after the grow notice (step 11, past the
    # hold at 10) and the larger group resumed there, so no step was trained twice
    added = next(e for e in resize["events"] if e["name"] == "node_added")
    grown = starts[added["starts_before"]]
    assert [step for step, _ in resize["metrics"]["grow_checkpoint"]] == [grown["step"]] == [11]
    assert resize["steps_lost"]["node_added"] == 0
    removed = next(e for e in resize["events"] if e["name"] == "node_removed")
    chaos_report(ChaosRow("node lost mid-epoch (elastic [1, 2], keep=global_batch)",
                          "continues on 1 worker from the last checkpoint, global batch 8 (accumulation 2)", 0,
                          resize["steps_lost"].get("node_removed"), resize["mlflow_runs"],
                          resize["recover_s"].get("node_removed")))
    chaos_report(ChaosRow("node back", "the ranks checkpoint at the next step; the group restarts on 2 from it", 0,
                          resize["steps_lost"].get("node_added"), resize["mlflow_runs"],
                          resize["recover_s"].get("node_added")))
    assert added["t"] > removed["t"]


def test_mlflow_s_world_series_is_the_world_that_trained_each_kept_step(resize):
    """world_size 2 -> 1 -> 2 with accumulation 1 -> 2 -> 1, each logged at the step its group began: step 4,
    trained first on two workers and again (kept) on one after the node loss, reads 1."""
    assert resize["error"] is None, resize["error"]
    metrics, starts = resize["metrics"], resize["starts"]
    for step in range(1, resize["final_step"] + 1):
        world = _kept_world(starts, step)
        assert _value_at(metrics["world_size"], step) == world, step
        assert _value_at(metrics["accum_grad_iters"], step) == 2 / world, step
    assert {v for _, v in metrics["global_batch"]} == {8.0}
    assert _value_at(metrics["world_size"], starts[1]["step"] + 1) == 1.0  # the re-run step shows the kept world


def test_one_checkpoint_per_step_even_at_an_epoch_end_of_a_stream_of_unknown_length(resize):
    """Epochs end at steps 8, 16 and 24 (read to the stream's end: no length up front); 24 is also a multiple of
    save_freq_steps (3): it has one checkpoint, the epoch end's."""
    assert resize["error"] is None, resize["error"]
    steps = resize["checkpoints"]
    assert len(steps) == len(set(steps)), steps
    assert {8, 16, 24} <= set(steps)


def test_the_skipped_image_count_survives_the_loss_of_the_node_that_held_its_ledger(resize):
    """The ledger started on the removed node. Two images are bad in every pass (4 samples), a third (2) from
    the node loss on: each of its 2 samples in 2 or 3 passes (epoch 0 may have read it before, and its
    samples can sit in two read units). The count never goes down across the loss and the restarts (the
    dead ledger is replaced, the restart restores the checkpoint's count) and ends as the run's."""
    assert resize["error"] is None, resize["error"]
    counts = [v for _, v in resize["metrics"]["skipped_images"]]
    assert counts == sorted(counts)
    removed = next(e for e in resize["events"] if e["name"] == "node_removed")
    assert counts[-1] >= (removed["skipped_before"] or 0)
    assert 3 * 4 + 2 * 2 <= counts[-1] <= 3 * 4 + 3 * 2


def test_sigterm_checkpoints_at_the_next_step_and_the_run_resumes_from_it(resize, chaos_report):
    assert resize["error"] is None, resize["error"]
    sigterm = next(e for e in resize["events"] if e["name"] == "sigterm")
    resumed = resize["starts"][sigterm["starts_before"]]["step"]
    # one notice checkpoint (logged to MLflow at its step), written at a step boundary past the step
    # reached when the signal came (the main thread sees it at Ray's next status poll, ~2 s: how many
    # steps that is depends on the machine) and before the run's end, and the restart resumed from it:
    # no step trained twice
    assert [step for step, _ in resize["metrics"]["preemption_checkpoint"]] == [resumed]
    assert sigterm["last_step_before"] < resumed < resize["final_step"] and resumed in resize["checkpoints"]
    assert resize["steps_lost"]["sigterm"] == 0
    assert resize["starts"][sigterm["starts_before"]]["world"] == 2
    chaos_report(ChaosRow("SIGTERM to a Ray Train worker (preemption notice)",
                          "every rank checkpoints at the next step boundary; the restart resumes there", 0,
                          resize["steps_lost"]["sigterm"], resize["mlflow_runs"], resize["recover_s"].get("sigterm")))


def test_one_mlflow_run_and_a_loss_history_without_gaps_or_repeats(resize):
    assert resize["error"] is None, resize["error"]
    assert resize["mlflow_runs"] == 1 and resize["status"] == "FINISHED"
    final = resize["final_step"]
    assert final == 24  # 3 epochs x 8 steps of the global batch 8, whatever the world size
    assert resize["loss_steps"] == list(range(1, final + 1))
    lr = dict(resize["metrics"]["lr"])
    assert sorted(lr) == list(range(1, final + 1))  # the schedule continued by step through every resize
    assert lr[1] == 0.0 and lr[4] == pytest.approx(7.5e-5)  # warm-up over 4 steps, in epoch 0
