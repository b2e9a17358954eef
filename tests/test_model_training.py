"""A few AdamW steps on one small batch lower each of ITC, ITM and LM (tiny model, CPU).

The BERT is the shipped 6-layer MiniLM. 20 steps at lr 3e-4 lowered all three losses for each of
seeds 0-5 (with a 2-layer cut of it, or 8 steps, ITC rose for some seeds: the LM loss, ~10 at the
start, dominates the shared Q-Former's first updates).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from helpers import small_model_cfg
from qformer.models import build_model

TEXTS = ["a red circle on the left", "a blue square at the top", "two green triangles", "a small yellow star"]


def _losses(model, samples) -> dict[str, float]:
    """Deterministic measures: eval mode (no dropout); ITM on fixed pairs in the loss's 1:2 layout,
    (i, i) matched, (i, i+1) and (i, i+2) not."""
    model.eval()
    with torch.no_grad():
        out = model(samples)
        embeds_ln = model.ln_vision(samples["image_embeds"])
        order = [torch.arange(4), torch.roll(torch.arange(4), 1), torch.roll(torch.arange(4), 2)]
        logits = model.itm_logits(torch.cat([embeds_ln] * 3),
                                  torch.cat([samples["text_ids"][o] for o in order]),
                                  torch.cat([samples["text_atts"][o] for o in order]))
        itm = F.cross_entropy(logits, torch.tensor([1] * 4 + [0] * 8))
    return {"loss_itc": float(out.loss_itc), "loss_itm": float(itm), "loss_lm": float(out.loss_lm)}


def test_adamw_steps_lower_every_loss(tiny_bert):
    torch.manual_seed(0)
    model = build_model(small_model_cfg(tiny_bert, max_txt_len=12, embed_dim=32))
    ids, atts = model.tokenize(TEXTS)
    # four clearly different images (distinct brightness + noise): features the Q-Former can tell apart
    images = torch.randn(4, 3, 32, 32) * 0.3 + torch.tensor([-1.5, -0.5, 0.5, 1.5]).view(4, 1, 1, 1)
    samples = {"image_embeds": model.vit_features(images), "text_ids": ids, "text_atts": atts}
    before = _losses(model, samples)
    opt = torch.optim.AdamW(model.get_optimizer_params(weight_decay=0.05), lr=3e-4)
    for _ in range(20):
        model.train()
        model(samples).loss.backward()
        opt.step()
        opt.zero_grad()
    after = _losses(model, samples)
    for k in before:
        assert after[k] < before[k], (k, before, after)


def test_sparse_word_lookups_give_the_dense_paths_gradients(tiny_bert):
    """The text passes' word lookups hand back sparse rows (qformer_layers.BertEmbeddings.sparse_word_grads);
    summed with the tied LM head's dense gradient, the word embedding's gradient is dense and every gradient
    equals the dense lookups' (same weights, same batch, eval mode, ITM negatives seeded alike)."""
    model = build_model(small_model_cfg(tiny_bert)).eval()
    ids, atts = model.tokenize(TEXTS)
    samples = {"image": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
               "text_ids": ids, "text_atts": atts}
    embeddings = model.Qformer.bert.embeddings
    assert embeddings.sparse_word_grads
    grads, losses = {}, {}
    for sparse in (True, False):
        embeddings.sparse_word_grads = sparse
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        out = model(samples)
        out.loss.backward()
        losses[sparse] = float(out.loss)
        grads[sparse] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    word = "Qformer.bert.embeddings.word_embeddings.weight"
    assert not grads[True][word].is_sparse and grads[True][word].abs().sum() > 0
    assert losses[True] == losses[False]
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=0, atol=1e-6, msg=name)


def _saved_bytes_and_grads(model, samples) -> tuple[int, float, dict[str, torch.Tensor]]:
    """One training forward/backward (dropout on, seeded): the bytes autograd keeps for the backward (each
    storage once), the loss and every gradient."""
    storages: dict[int, int] = {}

    def keep(t):
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    model.train().zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = model(samples)
    out.loss.backward()
    return sum(storages.values()), float(out.loss), {n: p.grad.clone() for n, p in model.named_parameters()
                                                     if p.grad is not None}


def test_recomputed_q_former_layers_give_the_same_loss_and_gradients_for_less_memory(tiny_bert):
    """model.qformer_grad_checkpoint: each Q-Former layer's activations are recomputed in the backward pass
    (dropout replays its masks), so the training step is the same, with far fewer bytes kept for it."""
    torch.manual_seed(0)
    model = build_model(small_model_cfg(tiny_bert, qformer_grad_checkpoint=True))
    assert model.Qformer.config.gradient_checkpointing
    ids, atts = model.tokenize(TEXTS)
    samples = {"image": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
               "text_ids": ids, "text_atts": atts}
    kept, loss, grads = {}, {}, {}
    for recompute in (False, True):
        model.Qformer.config.gradient_checkpointing = recompute
        kept[recompute], loss[recompute], grads[recompute] = _saved_bytes_and_grads(model, samples)
    assert loss[True] == loss[False]
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=0, atol=1e-6, msg=name)
    assert kept[True] < 0.5 * kept[False], kept  # each layer's inputs and outputs (measured: 0.11x)
