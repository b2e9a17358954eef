"""Blip2Qformer: frozen ViT + trainable ln_vision + Q-Former, trained with ITC + ITM + LM (spec §3-§4).

Attribute names (`visual_encoder`, `ln_vision`, `Qformer`, `query_tokens`, `vision_proj`,
`text_proj`, `itm_head`, `temp`) give LAVIS's state-dict keys, so its checkpoints load as they are.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from qformer.models.bert_init import (
    copy_query_ffn_from_text,
    load_bert_weights,
    load_tokenizer,
    read_bert_state_dict,
    resolve_bert_dir,
)
from qformer.models.checkpoint_io import load_model_checkpoint
from qformer.models.gather import host_max_over_ranks
from qformer.models.losses import ITCLoss, ITMLoss, ItmImages, lm_inputs
from qformer.models.qformer_bert import BertLMHeadModel
from qformer.models.qformer_config import QFormerConfig
from qformer.models.qformer_layers import CrossKV
from qformer.models.vision import build_vision_encoder, load_vision_weights
from qformer.models.vision.build import fp16_vit_autocast, maybe_fp16
from qformer.models.vision.clip_vit import LayerNorm as FP32LayerNorm
from qformer.models.vision.layer_ids import vit_layer_id, vit_num_layers
from qformer.core.registry import register_model

log = logging.getLogger(__name__)


@dataclass
class Blip2Output:
    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_lm: torch.Tensor


def _cfg(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None and default is not None else value


@register_model("blip2")
class Blip2Qformer(nn.Module):
    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain": "configs/models/blip2/pretrain.yaml",
        "pretrain_vitL": "configs/models/blip2/pretrain_vitL.yaml",
        "tiny": "configs/models/blip2/tiny.yaml",
    }

    def __init__(
        self,
        vit_model: str = "eva_clip_g",
        img_size: int = 224,
        drop_path_rate: float = 0.0,
        use_grad_checkpoint: bool = False,
        vit_precision: str = "fp16",
        freeze_vit: bool = True,
        num_query_token: int = 32,
        cross_attention_freq: int = 2,
        embed_dim: int = 256,
        max_txt_len: int = 32,
        bert_model: str = "bert-base-uncased",
        vit_kwargs: dict | None = None,
        vit_weights: str | None = None,
        itc_gather_with_grad: bool = False,
        itm_negatives: str = "head",
        vit_fp16_on_cpu: bool = False,
        qformer_grad_checkpoint: bool = False,
    ):
        super().__init__()
        bert_dir = resolve_bert_dir(bert_model)
        self.tokenizer = load_tokenizer(bert_dir)

        self.visual_encoder = build_vision_encoder(vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_kwargs)
        if vit_weights:
            load_vision_weights(self.visual_encoder, str(vit_weights))
        self.vit_from_file = bool(vit_weights)
        self.vit_fp16 = maybe_fp16(self.visual_encoder, vit_precision, on_cpu=vit_fp16_on_cpu)
        self.freeze_vit = freeze_vit
        if freeze_vit:
            for p in self.visual_encoder.parameters():
                p.requires_grad = False
            self.visual_encoder.eval()
        width = self.visual_encoder.num_features
        self.ln_vision = FP32LayerNorm(width)  # eps 1e-5, fresh, trainable

        qcfg = QFormerConfig.from_bert_json(
            bert_dir / "config.json",
            vocab_size=len(self.tokenizer),
            encoder_width=width,
            cross_attention_freq=cross_attention_freq,
            query_length=num_query_token,
            gradient_checkpointing=qformer_grad_checkpoint,
        )
        self.Qformer = BertLMHeadModel(qcfg)
        report = load_bert_weights(self.Qformer, read_bert_state_dict(bert_dir))
        log.info("Q-Former: %d tensors from %s, %d ignored", len(report["loaded"]), bert_dir, len(report["skipped"]))
        copy_query_ffn_from_text(self.Qformer)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_token, qcfg.hidden_size))
        nn.init.normal_(self.query_tokens, std=qcfg.initializer_range)

        self.vision_proj = nn.Linear(qcfg.hidden_size, embed_dim)
        self.text_proj = nn.Linear(qcfg.hidden_size, embed_dim)
        self.itm_head = nn.Linear(qcfg.hidden_size, 2)
        self.temp = nn.Parameter(0.07 * torch.ones([]))
        self.max_txt_len = max_txt_len
        self.itc_loss = ITCLoss(gather_with_grad=itc_gather_with_grad)
        self.itm_loss = ITMLoss(negatives=itm_negatives)
        # The ITM pass takes its image K/V from the query pass instead of projecting 3B image rows
        # again (exact: same rows, same weights). Off only to measure or test the difference.
        self.reuse_itm_kv = True
        # the training forward always runs the LM pass (its tied head: a dense gradient for sparse lookups)
        self.Qformer.bert.embeddings.sparse_word_grads = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], vit_fp16_on_cpu: bool = False) -> "Blip2Qformer":
        """`vit_fp16_on_cpu`: convert an fp16 ViT on a CPU-only machine too (the run's autocast is fp16)."""
        _checkpoint_source(cfg)  # fail on an empty pretrained/finetuned before building anything
        vit_kwargs = _cfg(cfg, "vit_kwargs", {})
        if vit_kwargs is not None and not isinstance(vit_kwargs, dict):
            from omegaconf import OmegaConf  # lazy: the model builds without omegaconf (bench device's bare GPU box)

            vit_kwargs = OmegaConf.to_container(vit_kwargs, resolve=True)
        model = cls(
            vit_model=_cfg(cfg, "vit_model", "eva_clip_g"),
            img_size=int(_cfg(cfg, "image_size", 224)),
            drop_path_rate=float(_cfg(cfg, "drop_path_rate", 0.0)),
            use_grad_checkpoint=bool(_cfg(cfg, "use_grad_checkpoint", False)),
            vit_precision=_cfg(cfg, "vit_precision", "fp16"),
            freeze_vit=bool(_cfg(cfg, "freeze_vit", True)),
            num_query_token=int(_cfg(cfg, "num_query_token", 32)),
            cross_attention_freq=int(_cfg(cfg, "cross_attention_freq", 2)),
            embed_dim=int(_cfg(cfg, "embed_dim", 256)),
            max_txt_len=int(_cfg(cfg, "max_txt_len", 32)),
            bert_model=str(_cfg(cfg, "bert_model", "bert-base-uncased")),
            vit_kwargs=dict(vit_kwargs or {}),
            vit_weights=_cfg(cfg, "vit_weights", None),
            itc_gather_with_grad=bool(_cfg(cfg, "itc_gather_with_grad", False)),
            itm_negatives=str(_cfg(cfg, "itm_negatives", "head")),
            vit_fp16_on_cpu=vit_fp16_on_cpu,
            qformer_grad_checkpoint=bool(_cfg(cfg, "qformer_grad_checkpoint", False)),
        )
        model.load_checkpoint_from_config(cfg)
        return model

    def load_checkpoint_from_config(self, cfg: Mapping[str, Any]) -> dict[str, list[str]] | None:
        """LAVIS order: `finetuned` if load_finetuned, else `pretrained` if load_pretrained (spec §3.1)."""
        source = _checkpoint_source(cfg)
        return self.load_checkpoint(source) if source else None

    # ---- checkpoints -------------------------------------------------------------------------
    def load_checkpoint(self, path_or_state: str | Mapping[str, Any]) -> dict[str, list[str]]:
        """Non-strict load of a LAVIS-style checkpoint ({"model": sd}), a bare state dict, or a path/URL."""
        return load_model_checkpoint(self, path_or_state)

    def load_lavis_checkpoint(self, path: str) -> dict[str, list[str]]:
        return self.load_checkpoint(path)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """state_dict without frozen parameters (buffers and tied aliases kept), as LAVIS saves it."""
        frozen = {n for n, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k not in frozen}

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """What a training checkpoint stores: LAVIS's trainable state, plus the frozen ViT only when no
        weight file defines it (a randomly initialised encoder, e.g. the tiny config) — otherwise the
        checkpoint could not be evaluated or resumed without re-deriving that random init."""
        if self.vit_from_file or not self.freeze_vit:
            return self.trainable_state_dict()
        return {**self.trainable_state_dict(),
                **{f"visual_encoder.{k}": v for k, v in self.visual_encoder.state_dict().items()}}

    # ---- modes / optimiser ------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Blip2Qformer":
        super().train(mode)
        if self.freeze_vit:
            self.visual_encoder.eval()  # frozen ViT never re-enables dropout / drop-path
        return self

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    def get_optimizer_params(self, weight_decay: float, lr_scale: float = 1.0) -> list[dict]:
        """LAVIS HEAD groups (spec §5.2): 1-D or `.bias` -> no decay (note: 0-dim `temp` IS decayed);
        unfrozen ViT params get per-layer groups with lr_scale ** (num_layers + 1 - layer_id)."""
        num_layers = vit_num_layers(self.visual_encoder)
        groups: dict[str, dict] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = param.dim() == 1 or name.endswith(".bias")
            group, wd = ("no_decay", 0.0) if no_decay else ("decay", weight_decay)
            scale = 1.0
            if name.startswith("visual_encoder."):
                layer_id = vit_layer_id(name[len("visual_encoder."):], num_layers)
                group = f"vit_layer_{layer_id}_{group}"
                scale = lr_scale ** (num_layers + 1 - layer_id)
            if group not in groups:
                groups[group] = {"params": [], "weight_decay": wd, "lr_scale": scale, "name": group}
            groups[group]["params"].append(param)
        return list(groups.values())

    # ---- encoders ---------------------------------------------------------------------------
    def tokenize(self, texts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=max_length or self.max_txt_len, return_tensors="pt"
        )
        return tok.input_ids.to(self.device), tok.attention_mask.to(self.device)

    def vit_features(self, image: torch.Tensor) -> torch.Tensor:
        """Frozen ViT output [B,N,D] before ln_vision (no grad when frozen); an fp16 ViT under fp16 autocast."""
        grad = torch.no_grad() if self.freeze_vit else nullcontext()
        with grad, fp16_vit_autocast(self.vit_fp16, image.device.type):
            return self.visual_encoder(image)

    def _image_embeds_ln(self, image: torch.Tensor | None, image_embeds: torch.Tensor | None) -> torch.Tensor:
        if image_embeds is None:
            if image is None:
                raise ValueError("need samples['image'] or samples['image_embeds']")
            image_embeds = self.vit_features(image)
            if image_embeds.dtype != self.ln_vision.weight.dtype and not torch.is_autocast_enabled(image.device.type):
                # an fp16 ViT's tokens without the step's autocast (run.amp: false): the fp32 Q-Former takes
                # them as fp32, as LAVIS's `.float()` (else its first Linear fails on mixed dtypes)
                image_embeds = image_embeds.float()
        else:  # cached features (often fp16 on disk): ln_vision computes in its own dtype
            image_embeds = image_embeds.to(self.device, self.ln_vision.weight.dtype)
        return self.ln_vision(image_embeds)

    def _query_pass(self, image_embeds_ln: torch.Tensor, use_cache: bool = False, return_cross_kv: bool = False):
        query_tokens = self.query_tokens.expand(image_embeds_ln.shape[0], -1, -1)
        return self.Qformer.bert(query_embeds=query_tokens, encoder_hidden_states=image_embeds_ln,
                                 use_cache=use_cache, return_cross_kv=return_cross_kv)

    def encode_image(
        self, image: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_feats [B,Q,E] L2-normed, image_embeds_ln [B,N,D])."""
        embeds_ln = self._image_embeds_ln(image, image_embeds)
        out = self._query_pass(embeds_ln)
        return F.normalize(self.vision_proj(out.last_hidden_state), dim=-1), embeds_ln

    def encode_text(self, text_ids: torch.Tensor, text_atts: torch.Tensor) -> torch.Tensor:
        return self._encode_text(*trim_padding(text_ids, text_atts))

    def _encode_text(self, text_ids: torch.Tensor, text_atts: torch.Tensor) -> torch.Tensor:
        out = self.Qformer.bert(text_ids, attention_mask=text_atts, out_rows=1)  # only [CLS] is used
        return F.normalize(self.text_proj(out.last_hidden_state[:, 0]), dim=-1)

    def itm_logits(self, image_embeds_ln: torch.Tensor | ItmImages, text_ids: torch.Tensor, text_atts: torch.Tensor,
                   local_kv: CrossKV | None = None, text_width: int | None = None) -> torch.Tensor:
        """[n, 2]: itm_head on every query output, averaged over queries (spec §4.3).

        `image_embeds_ln` [n,N,D], or ItmImages whose local rows have image K/V `local_kv` (the query
        pass's, [B,heads,N,hd] per cross layer): rows then index those instead of being projected.
        `text_width`: the used columns if known on the host (see trim_padding)."""
        text_ids, text_atts = trim_padding(text_ids, text_atts, text_width)
        n, q = text_ids.shape[0], self.query_tokens.shape[1]
        query_tokens = self.query_tokens.expand(n, -1, -1)
        query_atts = torch.ones(n, q, dtype=text_atts.dtype, device=text_atts.device)
        images, rows_kv = image_embeds_ln, None
        if isinstance(images, ItmImages):
            images, rows_kv = (images.embeddings(), None) if local_kv is None else (None, self._rows_kv(images, local_kv))
        out = self.Qformer.bert(
            text_ids,
            attention_mask=torch.cat([query_atts, text_atts], dim=1),
            query_embeds=query_tokens,
            encoder_hidden_states=images,
            cross_key_values=rows_kv,
            out_rows=q,  # only the query outputs are used
        )
        return self.itm_head(out.last_hidden_state[:, :q]).mean(dim=1)

    def _rows_kv(self, images: ItmImages, local_kv: CrossKV) -> CrossKV:
        """Each row's image K/V: the local rows' from `local_kv`, the extra rows' projected here."""
        extra_kv = self.Qformer.bert.image_key_values(images.extra) if images.extra is not None else None
        rows = []
        for i, (k, v) in enumerate(local_kv):
            if extra_kv is not None:
                k, v = torch.cat([k, extra_kv[i][0].to(k.dtype)]), torch.cat([v, extra_kv[i][1].to(v.dtype)])
            rows.append((k[images.index], v[images.index]))
        return tuple(rows)

    def itm_logit(self, image_embeds_ln: torch.Tensor, text_ids: torch.Tensor, text_atts: torch.Tensor) -> torch.Tensor:
        """[n] positive-class logit averaged over queries (the eval re-rank score)."""
        return self.itm_logits(image_embeds_ln, text_ids, text_atts)[:, 1]

    # ---- training forward -------------------------------------------------------------------
    def text_plan(self, text_ids: torch.Tensor, text_atts: torch.Tensor) -> dict[str, Any]:
        """What the forward would otherwise read back from the device, worked out on the host from the
        CPU token batch before it is copied: the used text width (trim_padding), the ITM pass's (the widest
        over ranks: a CPU collective of one integer with several), and the flat indices of the LM targets
        (LMLoss.from_hidden). Passed in `samples`, they keep the step free of syncs."""
        width = used_text_width(text_atts) or text_atts.shape[1]
        targets = text_ids[:, 1:width] != self.tokenizer.pad_token_id  # LAVIS: labels = ids, pads -> -100
        return {"text_width": width, "itm_text_width": host_max_over_ranks(width),
                "lm_index": targets.reshape(-1).nonzero().squeeze(1)}

    def _text(self, samples: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "text_ids" in samples and samples["text_ids"] is not None:
            if "text_atts" not in samples:
                raise ValueError("samples has 'text_ids' but no 'text_atts'")
            return samples["text_ids"].to(self.device).long(), samples["text_atts"].to(self.device).long()
        if "text_input" in samples:
            return self.tokenize(samples["text_input"], self.max_txt_len)
        raise ValueError("samples needs 'text_input' (list of str) or 'text_ids' + 'text_atts'")

    def forward(self, samples: Mapping[str, Any]) -> Blip2Output:
        embeds_ln = self._image_embeds_ln(samples.get("image"), samples.get("image_embeds"))
        text_ids, text_atts = self._text(samples)
        b = embeds_ln.shape[0]
        if text_ids.shape[0] != b:
            raise ValueError(f"batch has {b} images but {text_ids.shape[0]} texts")

        query_out = self._query_pass(embeds_ln, use_cache=True, return_cross_kv=self.reuse_itm_kv)
        image_feats = F.normalize(self.vision_proj(query_out.last_hidden_state), dim=-1)
        width = samples.get("text_width")  # from text_plan; None: found on the device (a sync on CUDA)
        local_ids, local_atts = trim_padding(text_ids, text_atts, width)  # text and LM passes: no padding columns
        text_feat = self._encode_text(local_ids, local_atts)

        itc = self.itc_loss(image_feats, text_feat, self.temp)
        # ITM rows hold other ranks' texts as negatives: the widest over ranks (planned on the host), else counted
        matcher = partial(self.itm_logits, text_width=samples.get("itm_text_width"))
        if self.reuse_itm_kv:
            matcher = partial(matcher, local_kv=query_out.cross_key_values)
        loss_itm = self.itm_loss(matcher, embeds_ln, text_ids, text_atts, itc.sim_i2t, itc.sim_t2i,
                                 by_index=self.reuse_itm_kv)

        decoder_ids, labels = lm_inputs(local_ids, self.tokenizer.bos_token_id, self.tokenizer.pad_token_id)
        query_atts = torch.ones(b, self.query_tokens.shape[1], dtype=local_atts.dtype, device=local_atts.device)
        lm = self.Qformer(
            decoder_ids,
            attention_mask=torch.cat([query_atts, local_atts], dim=1),
            past_key_values=query_out.past_key_values,
            labels=labels,
            return_logits=False,
            lm_index=samples.get("lm_index"),
        )
        loss = itc.loss + loss_itm + lm.loss
        return Blip2Output(loss=loss, loss_itc=itc.loss, loss_itm=loss_itm, loss_lm=lm.loss)


def trim_padding(text_ids: torch.Tensor, text_atts: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing columns that are padding in every row. Pads are masked out of attention and ignored
    by the LM loss, so every output that is used is unchanged; only the wasted work goes (LAVIS pads
    to max_length, 32/35 tokens, while COCO captions average ~12). Local passes only: the ITM negatives
    are gathered across ranks at full width first. `width`: the used columns when known on the host
    (Blip2Qformer.text_plan); otherwise they are counted here, one host sync on CUDA."""
    if width is None:
        width = used_text_width(text_atts)
    if 0 < width < text_atts.shape[1]:
        return text_ids[:, :width], text_atts[:, :width]
    return text_ids, text_atts


def used_text_width(text_atts: torch.Tensor) -> int:
    """Columns that are not padding in some row (right padding, as BERT tokenizers: a prefix)."""
    return int(text_atts.any(dim=0).sum())


def _checkpoint_source(cfg: Mapping[str, Any]) -> str | None:
    for flag, key in (("load_finetuned", "finetuned"), ("load_pretrained", "pretrained")):
        if _cfg(cfg, flag, False):
            source = _cfg(cfg, key, "")
            if not source:
                raise ValueError(f"model.{flag} is True but model.{key} is empty")
            return str(source)
    return None
