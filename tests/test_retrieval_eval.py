"""evaluate_retrieval plumbing on real image files: sharding, 2-process gloo == 1 process, skipped images.

The model here is a small deterministic stand-in with the Blip2Qformer evaluation API (tokenize,
encode_text, encode_image, itm_logit), so these tests isolate the evaluation's distribution logic; the
real Blip2Qformer is exercised in tests/test_eval_model.py.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import free_port
from PIL import Image

from qformer.data.processors.image import BlipImageEvalProcessor
from qformer.data.retrieval import RetrievalSplit
from qformer.evaluate.metrics import retrieval_metrics
from qformer.evaluate.retrieval import EVAL_MAX_TXT_LEN, compute_score_matrices, evaluate_retrieval

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "white": (245, 245, 245), "black": (10, 10, 10), "purple": (140, 30, 160)}


class ToyRetrievalModel(torch.nn.Module):
    """Deterministic stand-in: images -> Q query features by a linear map of mean colours; texts -> hashed words."""

    embed_dim = 16
    num_query_token = 3

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.vocab = torch.nn.Parameter(torch.randn(512, self.embed_dim, generator=g))
        self.img = torch.nn.Parameter(torch.randn(self.num_query_token, 3, self.embed_dim, generator=g))
        self.itm = torch.nn.Parameter(torch.randn(self.embed_dim, self.embed_dim, generator=g))
        self.dropout = torch.nn.Dropout(0.5)  # must be off during evaluation
        self.calls: list[str] = []

    def tokenize(self, texts, max_length):
        self.calls.append(f"tokenize:{max_length}")
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        atts = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            words = [sum(map(ord, w)) % 512 for w in t.split()][:max_length]
            ids[i, : len(words)] = torch.tensor(words)
            atts[i, : len(words)] = 1
        return ids, atts

    def _text(self, ids, atts):
        e = (self.vocab[ids] * atts[..., None]).sum(1) / atts.sum(1, keepdim=True).clamp(min=1)
        return self.dropout(e)

    def encode_text(self, ids, atts):
        return F.normalize(self._text(ids, atts), dim=-1)

    def encode_image(self, image=None, image_embeds=None):
        tokens = image.flatten(2).transpose(1, 2)  # [B, HW, 3] "ViT tokens"
        feats = torch.einsum("bc,qce->bqe", tokens.mean(1), self.img)
        return F.normalize(feats, dim=-1), tokens

    def itm_logit(self, image_embeds_ln, ids, atts):
        img = torch.einsum("bc,ce->be", image_embeds_ln.mean(1), self.img.mean(0))
        return (img @ self.itm * self._text(ids, atts)).sum(-1)


def _write_split(root, n_images: int, corrupt: tuple[int, ...] = ()) -> RetrievalSplit:
    """Write n solid-colour JPEGs (the `corrupt` ones as garbage bytes) and return their split."""
    names = list(COLOURS)
    for i in range(n_images):
        path = os.path.join(root, f"img_{i}.jpg")
        if i in corrupt:
            with open(path, "wb") as f:
                f.write(b"not a jpeg")
        else:
            shade = 1.0 - 0.1 * (i // len(names))
            Image.new("RGB", (20, 16), tuple(int(c * shade) for c in COLOURS[names[i % len(names)]])).save(path)
    return _split_for(root, n_images)


def _split_for(root, n_images: int) -> RetrievalSplit:
    names = list(COLOURS)
    paths, texts, img2txt, txt2img = [], [], [], []
    for i in range(n_images):
        name = names[i % len(names)]
        paths.append(os.path.join(root, f"img_{i}.jpg"))
        caps = [f"a {name} square", f"the picture is {name}"][: 1 + i % 2]
        img2txt.append(list(range(len(texts), len(texts) + len(caps))))
        txt2img.extend([i] * len(caps))
        texts.extend(caps)
    return RetrievalSplit(
        name="toy", split="test", image_paths=paths, texts=texts, img2txt=img2txt, txt2img=txt2img,
        image_ids=[str(i) for i in range(n_images)], image_size=8, vis_processor=BlipImageEvalProcessor(8),
    )


def test_single_process_eval_restores_train_mode_and_uses_max_length_35(tmp_path):
    split = _write_split(tmp_path, 9)
    model = ToyRetrievalModel()
    model.train()
    m = evaluate_retrieval(model, split, k_test=4, batch_size=4, device="cpu")
    assert model.training  # restored
    assert set(model.calls) == {f"tokenize:{EVAL_MAX_TXT_LEN}"}
    assert set(m) == {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10",
                      "txt_r_mean", "img_r_mean", "r_mean", "agg_metrics", "skipped_images"}
    assert m["skipped_images"] == 0
    # deterministic: dropout is off during evaluation, so a second run is identical
    assert evaluate_retrieval(model, split, k_test=4, batch_size=3, device="cpu") == m


def test_scores_match_a_direct_lavis_style_computation(tmp_path):
    split = _write_split(tmp_path, 8)
    model = ToyRetrievalModel().eval()
    s = compute_score_matrices(model, split, k_test=3, batch_size=5, device="cpu")
    # the same computation written out LAVIS-style, one image / one text at a time
    from qformer.data.normalize import normalize_uint8

    with torch.no_grad():
        ids, atts = model.tokenize(split.texts, EVAL_MAX_TXT_LEN)
        text = model.encode_text(ids, atts)
        imgs = torch.stack([torch.as_tensor(split.vis_processor(Image.open(p).convert("RGB"))) for p in split.image_paths])
        feats, vit = model.encode_image(image=normalize_uint8(imgs))
        sims = torch.stack([(f @ text.t()).max(0).values for f in feats])
        i2t = torch.full(sims.shape, -100.0)
        for i in range(len(sims)):
            v, idx = sims[i].topk(3)
            i2t[i, idx] = model.itm_logit(vit[i].repeat(3, 1, 1), ids[idx], atts[idx]) + v
        t2i = torch.full(sims.t().shape, -100.0)
        for t in range(sims.shape[1]):
            v, idx = sims[:, t].topk(3)
            t2i[t, idx] = model.itm_logit(vit[idx], ids[t].repeat(3, 1), atts[t].repeat(3, 1)) + v
    np.testing.assert_allclose(s.i2t, i2t.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.t2i, t2i.numpy(), rtol=1e-5, atol=1e-5)


def test_undecodable_image_leaves_with_its_captions(tmp_path):
    split = _write_split(tmp_path, 7, corrupt=(2,))
    s = compute_score_matrices(ToyRetrievalModel(), split, k_test=20, batch_size=4, device="cpu")
    assert s.skipped_images == 1
    assert evaluate_retrieval(ToyRetrievalModel(), split, k_test=20, batch_size=4, device="cpu")["skipped_images"] == 1
    assert s.i2t.shape == (6, len(split.texts) - len(split.img2txt[2]))
    assert len(s.img2txt) == 6 and all(0 <= i < 6 for i in s.txt2img)
    retrieval_metrics(s.i2t, s.t2i, s.img2txt, s.txt2img)  # consistent ground truth


def _worker(rank: int, world: int, port: int, root: str, n_images: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        split = _split_for(root, n_images)
        s = compute_score_matrices(ToyRetrievalModel(), split, k_test=3, batch_size=2, device="cpu")
        m = evaluate_retrieval(ToyRetrievalModel(), split, k_test=3, batch_size=2, device="cpu")
        torch.save({"i2t": s.i2t, "t2i": s.t2i, "metrics": m, "skipped": s.skipped_images}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "n_images, corrupt", [(7, ()), (3, (1,)), (1, ())], ids=["odd-split", "corrupt-image", "empty-share"]
)
def test_two_gloo_workers_equal_one_process(tmp_path, n_images, corrupt):
    import torch.multiprocessing as mp

    root = str(tmp_path)
    single_split = _write_split(root, n_images, corrupt)
    single = compute_score_matrices(ToyRetrievalModel(), single_split, k_test=3, batch_size=2, device="cpu")
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, free_port(), root, n_images, out), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        np.testing.assert_array_equal(got["i2t"], single.i2t)
        np.testing.assert_array_equal(got["t2i"], single.t2i)
        assert got["skipped"] == single.skipped_images
        assert got["metrics"] == {**retrieval_metrics(single.i2t, single.t2i, single.img2txt, single.txt2img),
                                  "skipped_images": float(len(corrupt))}  # counted once, not per rank


def test_autocast_applies_to_model_calls_only(tmp_path):
    split = _write_split(tmp_path, 6)
    model = ToyRetrievalModel()
    full = compute_score_matrices(model, split, k_test=2, batch_size=4, device="cpu")
    half = compute_score_matrices(model, split, k_test=2, batch_size=4, device="cpu", autocast_dtype=torch.bfloat16)
    assert half.i2t.dtype == np.float32
    assert not torch.is_autocast_enabled("cpu")
    ranked = full.i2t != -100.0
    np.testing.assert_allclose(half.i2t[ranked], full.i2t[ranked], atol=0.1)  # bf16 model maths, fp32 sums


def test_image_tokens_are_kept_in_the_autocast_dtype_with_unchanged_itm_scores(tmp_path, tiny_bert):
    """Evaluation keeps each image's ln_vision tokens where they were made, in the dtype the ITM pass's first
    layer (the cross-attention K/V projection) casts them to under autocast: half the memory of fp32, and
    each re-rank batch scores exactly as it would from the fp32 tokens."""
    from helpers import small_model

    _write_split(tmp_path, 6)
    split = _split_for(tmp_path, 6)
    split.vis_processor = BlipImageEvalProcessor(32)
    model = small_model(tiny_bert)
    score, seen = model.itm_logit, []

    def checked_itm_logit(tokens, ids, atts):
        seen.append((tokens.dtype, tokens.device.type))
        out = score(tokens, ids, atts)
        assert torch.equal(out, score(tokens.float(), ids, atts))  # the stored dtype changes no score
        return out

    model.itm_logit = checked_itm_logit
    m = evaluate_retrieval(model, split, k_test=3, batch_size=4, device="cpu", autocast_dtype=torch.bfloat16)
    assert seen and set(seen) == {(torch.bfloat16, "cpu")} and np.isfinite(m["r_mean"])
