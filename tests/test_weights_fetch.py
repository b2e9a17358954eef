"""`qformer weights fetch` against a loopback HTTP server standing in for LAVIS's bucket (the .pth files) and
the Hugging Face Hub (HF_ENDPOINT), run as the CLI is run: into a folder, into the loaders' own caches (then
read back offline with the server gone), into a bucket; bad names and damaged files. Training on what it
fetched: tests/test_dataprep_train.py."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from http_stub import StubServer, add_hub_repo

EVA_PATH = "/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
BLIP2_PATH = "/sfr-vision-language-research/LAVIS/models/BLIP2/blip2_pretrained.pth"
LAVIS_EVA_URL = "https://storage.googleapis.com" + EVA_PATH


def standin_state() -> dict[str, torch.Tensor]:
    return {"patch_embed.proj.weight": torch.arange(12.0).reshape(3, 4), "cls_token": torch.ones(1, 1, 4)}


def _pth(state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def serve_weights(server: StubServer, bert_dir: str | Path) -> None:
    """The stand-in EVA file (with GCS's MD5 header; the first answer dropped mid-file) and BERT repository."""
    server.add(EVA_PATH, _pth(standin_state()), goog_md5=True, drop_after=300)
    files = {p.name: p.read_bytes() for p in Path(bert_dir).iterdir() if p.is_file()}
    add_hub_repo(server, "bert-base-uncased", files)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qformer.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_fetch_into_a_folder_prints_the_options_that_load_it(tiny_bert, tmp_path: Path) -> None:
    from qformer.models.bert_init import resolve_bert_dir
    from qformer.models.vision.weights import read_weights

    with StubServer() as server:
        serve_weights(server, tiny_bert)
        proc = cli("weights", "fetch", "eva_vit_g", "bert-base-uncased", "--to", str(tmp_path / "w"),
                   "--mirror", server.base, env={"HF_ENDPOINT": server.base, "HF_HUB_OFFLINE": "0"})
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
        assert server.ranges_asked(EVA_PATH) == [None, "bytes=300-"]  # the dropped answer was resumed
    eva, bert = tmp_path / "w" / "eva_vit_g.pth", tmp_path / "w" / "bert-base-uncased"
    assert f"--options model.vit_weights={eva} model.bert_model={bert}" in proc.stdout
    assert all(torch.equal(read_weights(str(eva))[k], v) for k, v in standin_state().items())
    assert (resolve_bert_dir(str(bert)) / "config.json").read_bytes() == (Path(tiny_bert) / "config.json").read_bytes()


def test_fetch_into_the_loaders_caches_then_load_offline(tiny_bert, tmp_path: Path) -> None:
    """No --to: torch.hub's cache (TORCH_HOME) and Hugging Face's (HF_HOME); then, the server gone and the hub
    offline, the packaged config values (the LAVIS URL, `bert-base-uncased`) load from those caches."""
    caches = {"TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf")}
    with StubServer() as server:
        serve_weights(server, tiny_bert)
        proc = cli("weights", "fetch", "eva_vit_g", "bert-base-uncased", "--mirror", server.base,
                   env={**caches, "HF_ENDPOINT": server.base, "HF_HUB_OFFLINE": "0"})
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert f"eva_vit_g: model.vit_weights={LAVIS_EVA_URL}" in proc.stdout
    assert (tmp_path / "torch/hub/checkpoints/eva_vit_g.pth").is_file()
    check = ("from qformer.models.vision.weights import read_weights; from qformer.models.bert_init import "
             f"resolve_bert_dir; s = read_weights({LAVIS_EVA_URL!r}); d = resolve_bert_dir('bert-base-uncased'); "
             "print(sorted(s), (d / 'vocab.txt').is_file())")
    offline = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300,
                             env={**os.environ, **caches, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert offline.stdout.strip() == "['cls_token', 'patch_embed.proj.weight'] True"


def test_unknown_names_and_damaged_files(tmp_path: Path) -> None:
    proc = cli("weights", "fetch", "eva_vit", "--to", str(tmp_path))
    assert proc.returncode == 2 and "known: eva_vit_g, clip_vit_L" in proc.stderr and "did you mean eva_vit_g" in proc.stderr
    good = _pth(standin_state())
    with zipfile.ZipFile(io.BytesIO(good)) as zf:
        member = max(zf.infolist(), key=lambda i: i.file_size)  # a tensor's storage, stored uncompressed
    damaged = bytearray(good)
    head = member.header_offset
    start = head + 30 + int.from_bytes(good[head + 26:head + 28], "little") + int.from_bytes(good[head + 28:head + 30],
                                                                                              "little")
    damaged[start + 1] ^= 0xFF  # a byte of its data: the member's CRC no longer matches
    with StubServer() as server:
        server.add(EVA_PATH, bytes(damaged))
        server.add(BLIP2_PATH, status=404)
        proc = cli("weights", "fetch", "eva_vit_g", "blip2_pretrained", "--to", str(tmp_path), "--mirror", server.base)
    assert proc.returncode == 1
    assert "blip2_pretrained.pth: HTTP 404" in proc.stdout
    assert "eva_vit_g.pth" in proc.stdout and ("CRC" in proc.stdout or "not a torch checkpoint" in proc.stdout)


def test_fetch_into_a_bucket_and_load_from_it(tiny_bert, tmp_path: Path, s3_endpoint: str, monkeypatch) -> None:
    from qformer.data.storage import exists
    from qformer.models.bert_init import resolve_bert_dir
    from qformer.models.vision.weights import read_weights

    with StubServer() as server:
        serve_weights(server, tiny_bert)
        proc = cli("weights", "fetch", "eva_vit_g", "bert-base-uncased", "--to", "s3://shards/weights", "--mirror",
                   server.base, env={"AWS_ENDPOINT_URL": s3_endpoint, "QFORMER_HOME": str(tmp_path / "home"),
                                     "HF_ENDPOINT": server.base, "HF_HUB_OFFLINE": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "model.vit_weights=s3://shards/weights/eva_vit_g.pth" in proc.stdout
    assert "model.bert_model=s3://shards/weights/bert-base-uncased" in proc.stdout
    assert exists("s3://shards/weights/weights.json", s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # what a node reading the config values does
    state = read_weights("s3://shards/weights/eva_vit_g.pth")
    assert all(torch.equal(state[k], v) for k, v in standin_state().items())
    bert = resolve_bert_dir("s3://shards/weights/bert-base-uncased")
    assert (bert / "vocab.txt").read_bytes() == (Path(tiny_bert) / "vocab.txt").read_bytes()
