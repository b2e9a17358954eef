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


def _metric_at(history: list, step: int) -> float:
    return dict(history)[step]


def test_node_loss_shrinks_keeps_the_global_batch_and_the_node_return_grows(resize, chaos_report):
    assert resize["error"] is None, resize["error"]
    starts = resize["starts"]
    # first group on both nodes; after the node loss one worker; back to two at the next resize check
    assert [s["world"] for s in starts[:3]] == [2, 1, 2]
    one = starts[1]
    assert (one["worker_batch"], one["micro_per_step"], one["accum_grad_iters"], one["global_batch"]) == (4, 2, 2, 8)
    assert all(s["global_batch"] == 8 for s in starts)
    # every restart resumed from a checkpoint written before it (the node left after step 3's registered)
    for event in resize["events"]:
        assert starts[event["starts_before"]]["step"] in resize["checkpoints"]
    assert one["step"] >= 3
    assert resize["steps_lost"]["node_removed"] <= 3  # save_freq_steps bounds what a node loss costs
    # MLflow shows the resize: world_size 2 -> 1 -> 2, global_batch 8 throughout, accumulation 1 -> 2 -> 1
    world = [v for _, v in resize["metrics"]["world_size"]]
    assert 1.0 in world and world[0] == world[-1] == 2.0
    assert {v for _, v in resize["metrics"]["global_batch"]} == {8.0}
    assert {v for _, v in resize["metrics"]["accum_grad_iters"]} == {1.0, 2.0}
    for step, size in resize["metrics"]["world_size"]:
        assert _metric_at(resize["metrics"]["accum_grad_iters"], step) == 2 / size
    removed = next(e for e in resize["events"] if e["name"] == "node_removed")
    added = next(e for e in resize["events"] if e["name"] == "node_added")
    chaos_report(ChaosRow("node lost mid-epoch (elastic [1, 2], keep=global_batch)",
                          "continues on 1 worker from the last checkpoint, global batch 8 (accumulation 2)", 0,
                          resize["steps_lost"].get("node_removed"), resize["mlflow_runs"],
                          resize["recover_s"].get("node_removed")))
    chaos_report(ChaosRow("node back", "grows to 2 workers at the next resize check", 0,
                          resize["steps_lost"].get("node_added"), resize["mlflow_runs"],
                          resize["recover_s"].get("node_added")))
    assert added["t"] > removed["t"]


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
