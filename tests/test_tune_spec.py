"""Sweep files, search spaces and their validation against the config schema (no Ray cluster, no training)."""
from __future__ import annotations

from pathlib import Path

import pytest

from qformer.config import ConfigError, load_config
from qformer.jobs.sweep.overrides import format_value, sampled_options
from qformer.jobs.sweep.search_space import parse_search_space
from qformer.jobs.sweep.spec import load_sweep
from qformer.jobs.sweep.validate import validate_sweep

REPO = Path(__file__).resolve().parents[1]
TINY_BASE = REPO / "experiments" / "demo" / "tiny_shapes.yaml"


def write_sweep(tmp_path: Path, search_space: str, extra: str = "", base: str | None = None) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"base: {base or TINY_BASE}\n"
        "options: [run.ray.num_workers=1]\n"  # the demo's base trains in Train local mode; trials need a worker
        "tune:\n"
        "  metric: val/r_mean\n"
        "  mode: max\n"
        f"{extra}"
        "  search_space:\n" + "".join(f"    {line}\n" for line in search_space.strip().splitlines())
    )
    return path


LR_Q = "run.init_lr: {loguniform: [1e-5, 3e-4]}\nmodel.num_query_token: {choice: [4, 8]}"


def test_shipped_sweeps_load_and_validate():
    for name in ("lr_queries.yaml", "tiny_lr_queries.yaml"):
        spec = load_sweep(REPO / "experiments" / "sweeps" / name)
        base = validate_sweep(spec)
        assert set(spec.search_space) == {"run.init_lr", "model.num_query_token"}
        assert spec.search_space["run.init_lr"].kind == "loguniform"
        assert spec.scheduler.type == "asha" and spec.mode == "max"
        assert base.run.valid_splits == ["val"]  # a metric to rank on needs an evaluation split
    full = load_sweep(REPO / "experiments" / "sweeps" / "lr_queries.yaml")
    assert full.base_path == (REPO / "experiments" / "blip2" / "pretrain_stage1.yaml").resolve()


def test_parse_values_and_defaults(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, LR_Q))
    assert spec.name == "sweep"  # the file's stem
    assert spec.search_space["run.init_lr"].args == (1e-5, 3e-4)  # 1e-5 read as a float, not a string
    assert spec.resources_per_trial == {"CPU": 0.25}
    assert spec.scheduler.time_attr == "training_iteration" and spec.num_samples == 1


def test_options_split_between_sweep_and_base(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, LR_Q), [
        "tune.num_samples=2", "run.max_epoch=1", "tune.scheduler.max_t=7",
        "tune.search_space.model.num_query_token={choice: [2, 4]}", "tune.name=other",
    ])
    assert spec.num_samples == 2 and spec.scheduler.max_t == 7 and spec.name == "other"
    assert spec.search_space["model.num_query_token"].args == (2, 4)
    assert spec.base_options == ["run.ray.num_workers=1", "run.max_epoch=1"]
    assert validate_sweep(spec).run.max_epoch == 1


def test_base_relative_to_sweep_file(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "base.yaml").write_text(TINY_BASE.read_text())
    (tmp_path / "sweeps").mkdir()
    src = write_sweep(tmp_path, LR_Q, base="../exp/base.yaml")
    moved = tmp_path / "sweeps" / "s.yaml"
    src.rename(moved)
    assert load_sweep(moved).base_path == (tmp_path / "exp" / "base.yaml").resolve()


@pytest.mark.parametrize("search_space, extra, needle", [
    ("run.init_lr: {normal: [0, 1]}", "", "unknown sampler 'normal'"),
    ("run.init_lr: {loguniform: [0, 1e-3]}", "", "> 0 on a log scale"),
    ("run.init_lr: {uniform: [1e-3, 1e-4]}", "", "low must be < high"),
    ("run.init_lr: {uniform: [1e-3]}", "", "tune.search_space.run.init_lr.uniform takes"),
    ("model.num_query_token: {randint: [4.5, 9]}", "", "integer bounds"),
    ("model.num_query_token: {choice: []}", "", "tune.search_space.model.num_query_token.choice"),
    ("run.init_lr: 1e-4", "", "tune.search_space.run.init_lr must be one of"),
    (LR_Q, "  mode: maximise\n", "tune.mode"),
    (LR_Q, "  num_sample: 3\n", "tune.num_sample"),
    (LR_Q, "  scheduler: {type: hyperband}\n", "tune.scheduler.type"),
    (LR_Q, "  scheduler: {grace_period: 5, max_t: 2}\n", "grace_period"),
    (LR_Q, "  scheduler: {reduction_factor: 1}\n", "reduction_factor"),
])
def test_bad_sweep_file_names_the_key(tmp_path, search_space, extra, needle):
    path = write_sweep(tmp_path, search_space, extra.replace("mode: max\n", ""))
    if "mode:" in extra:  # replace the default mode line rather than adding a second one
        path.write_text(path.read_text().replace("  mode: max\n", ""))
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="sweep file not found"):
        load_sweep(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="base: missing.yaml not found"):
        load_sweep(write_sweep(tmp_path, LR_Q, base="missing.yaml"))


@pytest.mark.parametrize("search_space, needle", [
    ("run.init_lrr: {loguniform: [1e-5, 3e-4]}", "did you mean run.init_lr"),
    ("model.num_query_tokens: {choice: [4, 8]}", "tune.search_space.model.num_query_tokens"),
    ("model.num_query_token: {loguniform: [4, 32]}", "model.num_query_token is int"),
    ("run.lr_sched: {choice: [cosine]}", "must be one of"),
    ("run.init_lr: {choice: [fast, slow]}", "run.init_lr is float"),
    ("run.ray: {choice: [1, 2]}", "is a section"),
])
def test_invalid_search_space_key_fails_validation(tmp_path, search_space, needle):
    spec = load_sweep(write_sweep(tmp_path, search_space))
    with pytest.raises(ConfigError) as err:
        validate_sweep(spec)
    message = str(err.value)
    assert needle in message and "tune.search_space." in message and str(spec.sweep_path) in message


@pytest.mark.parametrize("search_space, options, needle", [
    # the shipped tiny sweep once sampled init_lr down to 1e-6 over the base's min_lr 1e-5
    ("run.init_lr: {loguniform: [1e-6, 1e-2]}", [],
     "tune.search_space.run.init_lr: loguniform [1e-06, 0.01] samples 1e-06, below run.min_lr (1e-05)"),
    ("run.min_lr: {uniform: [1e-5, 1e-3]}", [], "tune.search_space.run.min_lr: uniform [1e-05, 0.001] samples "
                                                "0.001, above run.init_lr (0.0003)"),
    ("run.init_lr: {choice: [1e-4, 1e-3]}\nrun.min_lr: {choice: [0.0, 2e-4]}", [], "tune.search_space.run.init_lr"),
    ("run.warmup_lr: {uniform: [0.0, 1e-3]}", [], "warm-up would start above"),
], ids=["init_lr-below-min_lr", "min_lr-above-init_lr", "both-swept", "warmup_lr"])
def test_search_space_crossing_another_keys_bound_is_refused(tmp_path, search_space, options, needle):
    spec = load_sweep(write_sweep(tmp_path, search_space), options)
    with pytest.raises(ConfigError) as err:
        validate_sweep(spec)
    assert needle in str(err.value) and str(spec.sweep_path) in str(err.value)


@pytest.mark.parametrize("search_space, options", [
    ("run.init_lr: {loguniform: [1e-6, 1e-2]}", ["run.min_lr=0.0"]),
    ("run.init_lr: {loguniform: [1e-6, 1e-2]}", ["run.lr_sched=constant_lr", "run.warmup_lr=-1"]),  # no decay
    ("run.warmup_lr: {uniform: [0.0, 1e-3]}", ["run.warmup_steps=0"]),  # no warm-up
    ("run.init_lr: {loguniform: [1e-5, 1e-3]}\nrun.min_lr: {choice: [0.0, 1e-5]}", []),  # equal is no crossing
])
def test_search_space_within_bounds_is_accepted(tmp_path, search_space, options):
    validate_sweep(load_sweep(write_sweep(tmp_path, search_space), options))


def test_domains_translate_to_tune():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = parse_search_space({
        "run.init_lr": {"loguniform": [1e-5, 3e-4]}, "run.weight_decay": {"uniform": [0.0, 0.1]},
        "model.num_query_token": {"choice": [8, 16, 32]}, "run.seed": {"randint": [0, 10]},
        "run.min_lr": {"quniform": [1e-6, 1e-5, 1e-6]},
    }, "test")
    domains = {k: d.to_tune() for k, d in space.items()}
    assert isinstance(domains["run.init_lr"], Float) and isinstance(domains["run.weight_decay"], Float)
    assert isinstance(domains["model.num_query_token"], Categorical)
    assert domains["model.num_query_token"].categories == [8, 16, 32]
    assert isinstance(domains["run.seed"], Integer)
    lrs = [domains["run.init_lr"].sample() for _ in range(50)]
    assert all(1e-5 <= v <= 3e-4 for v in lrs)
    grid = parse_search_space({"run.init_lr": {"grid": [1e-4, 2e-4]}}, "t")["run.init_lr"].to_tune()
    assert grid == {"grid_search": [1e-4, 2e-4]}


def test_sampled_values_round_trip_through_load_config():
    sampled = {"run.init_lr": 3.0e-05, "model.num_query_token": 16, "run.lr_sched": "constant_lr"}
    assert format_value(3e-05) == "3.0e-05"  # a '.' so YAML 1.1 readers also see a float
    cfg = load_config(str(TINY_BASE), sampled_options(sampled))
    assert cfg.run.init_lr == pytest.approx(3e-05) and isinstance(cfg.run.init_lr, float)
    assert cfg.model.num_query_token == 16 and cfg.run.lr_sched == "constant_lr"
    import numpy as np

    assert format_value(np.float64(1e-4)) == "0.0001" and format_value(np.int64(8)) == "8"


def test_cli_reports_a_bad_search_space_key_without_starting_anything(tmp_path, capsys):
    from qformer.cli import main

    code = main(["tune", "--cfg-path", str(REPO / "experiments" / "sweeps" / "tiny_lr_queries.yaml"),
                 "--options", "tune.search_space.model.num_query_tokens={choice: [4, 8]}",
                 f"tune.storage_path={tmp_path / 'sweeps'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "qformer tune:" in err and "tune.search_space.model.num_query_tokens" in err
    assert "did you mean model.num_query_token" in err
    assert not (tmp_path / "sweeps").exists()


def test_train_local_mode_is_refused_before_any_trial(tmp_path):
    """Every trial of a sweep with run.ray.num_workers=0 errored (Tune trials report through Train's controller)."""
    spec = load_sweep(write_sweep(tmp_path, "run.init_lr: {choice: [1e-4, 1e-3]}"), ["run.ray.num_workers=0"])
    with pytest.raises(ConfigError, match=r"run\.ray\.num_workers is 0 .*at least 1 Train worker") as err:
        validate_sweep(spec)
    assert str(spec.sweep_path) in str(err.value)
    validate_sweep(load_sweep(write_sweep(tmp_path, "run.init_lr: {choice: [1e-4, 1e-3]}"), ["run.ray.num_workers=1"]))
