"""Converters between our (= LAVIS) state-dict names and transformers' BLIP-2 names.

Targets: `Blip2ForImageTextRetrieval` (vision model + Q-Former + text embeddings + projections +
itm_head; needs the EVA encoder, which is what HF's vision model is) and `Blip2QFormerModel`
(the Q-Former body alone, any vision encoder). Not representable in HF's retrieval model and
dropped on export: the LM head (`Qformer.cls.*`) and `temp`.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from qformer.models.vision.eva_vit import EvaVisionTransformer

log = logging.getLogger(__name__)

# (ours, hf) regex pairs for the Q-Former; applied to names with the "Qformer.bert." / "qformer." prefix removed
_QFORMER_RULES = [
    (r"^embeddings\.LayerNorm\.(weight|bias)$", r"layernorm.\1"),
    (r"^encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(\w+)\.(weight|bias)$", r"encoder.layer.\1.\2.attention.\3.\4"),
    (r"^encoder\.layer\.(\d+)\.(.+)$", r"encoder.layer.\1.\2"),
]
# EVA ViT names (ours = LAVIS) <-> transformers Blip2VisionModel names, one table for both directions.
# <i> is a block index, <w> weight|bias, <fc> fc1|fc2. q_bias/v_bias <-> qkv.bias is handled apart.
_VISION_NAMES = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.<w>", "embeddings.patch_embedding.<w>"),
    ("blocks.<i>.norm1.<w>", "encoder.layers.<i>.layer_norm1.<w>"),
    ("blocks.<i>.norm2.<w>", "encoder.layers.<i>.layer_norm2.<w>"),
    ("blocks.<i>.attn.qkv.weight", "encoder.layers.<i>.self_attn.qkv.weight"),
    ("blocks.<i>.attn.proj.<w>", "encoder.layers.<i>.self_attn.projection.<w>"),
    ("blocks.<i>.mlp.<fc>.<w>", "encoder.layers.<i>.mlp.<fc>.<w>"),
]
_TOKENS = {"i": r"\d+", "w": "weight|bias", "fc": "fc1|fc2"}


def _vision_name(name: str, to_hf: bool) -> str | None:
    """Rename one vision key through _VISION_NAMES (ours -> HF, or HF -> ours); None if no rule matches."""
    for ours, hf in _VISION_NAMES:
        src, dst = (ours, hf) if to_hf else (hf, ours)
        pattern = re.sub(r"<(\w+)>", lambda t: f"(?P<{t.group(1)}>{_TOKENS[t.group(1)]})", re.escape(src))
        m = re.fullmatch(pattern, name)
        if m:
            return re.sub(r"<(\w+)>", lambda t: m.group(t.group(1)), dst)
    return None


_TOP = {
    "query_tokens": "query_tokens",
    "vision_proj.weight": "vision_projection.weight",
    "vision_proj.bias": "vision_projection.bias",
    "text_proj.weight": "text_projection.weight",
    "text_proj.bias": "text_projection.bias",
    "itm_head.weight": "itm_head.weight",
    "itm_head.bias": "itm_head.bias",
    "ln_vision.weight": "vision_model.post_layernorm.weight",
    "ln_vision.bias": "vision_model.post_layernorm.bias",
    "Qformer.bert.embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "Qformer.bert.embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
}


def _apply(rules, name: str) -> str | None:
    for pattern, repl in rules:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def qformer_to_hf(state: dict[str, torch.Tensor], prefix: str = "Qformer.bert.") -> dict[str, torch.Tensor]:
    """Our Q-Former body -> `Blip2QFormerModel` keys (no prefix)."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = _apply(_QFORMER_RULES, key[len(prefix):])
        if name is not None:
            out[name] = value
    return out


def to_hf_retrieval(state: dict[str, torch.Tensor], include_vision: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our full state dict -> `Blip2ForImageTextRetrieval` keys; returns (converted, dropped keys)."""
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    q_bias: dict[str, torch.Tensor] = {}
    v_bias: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _TOP:
            out[_TOP[key]] = value
        elif key.startswith("Qformer.bert.encoder.") or key.startswith("Qformer.bert.embeddings.LayerNorm."):
            out["qformer." + _apply(_QFORMER_RULES, key[len("Qformer.bert."):])] = value
        elif key.startswith("visual_encoder.") and include_vision:
            sub = key[len("visual_encoder."):]
            m = re.match(r"^blocks\.(\d+)\.attn\.(q_bias|v_bias)$", sub)
            if m:
                (q_bias if m.group(2) == "q_bias" else v_bias)[m.group(1)] = value
                continue
            name = _vision_name(sub, to_hf=True)
            if name is None:
                dropped.append(key)
            else:
                out["vision_model." + name] = value
        else:
            dropped.append(key)  # LM head, temp, position_ids, non-EVA vision weights
    for layer, q in q_bias.items():
        out[f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v_bias[layer]])
    return out, dropped


_TOP_INV = {v: k for k, v in _TOP.items()}


def from_hf_retrieval(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`Blip2ForImageTextRetrieval` keys -> ours (LM head and temp are not in HF's model)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        if key in _TOP_INV:
            out[_TOP_INV[key]] = value
            continue
        if key.startswith("qformer."):
            sub = key[len("qformer."):]
            if sub.startswith("layernorm."):
                out["Qformer.bert.embeddings.LayerNorm." + sub.split(".", 1)[1]] = value
                continue
            sub = re.sub(r"^encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.", r"encoder.layer.\1.\2.self.", sub)
            out["Qformer.bert." + sub] = value
            continue
        if key.startswith("vision_model."):
            sub = key[len("vision_model."):]
            m = re.match(r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$", sub)
            if m:
                q, _, v = value.chunk(3)
                out[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = q
                out[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = v
                continue
            name = _vision_name(sub, to_hf=False)
            if name is None:
                log.info("HF key without a counterpart: %s", key)
            else:
                out["visual_encoder." + name] = value
            continue
        log.info("HF key without a counterpart: %s", key)
    return out


def hf_qformer_config(model):
    """`Blip2QFormerConfig` equivalent to `model.Qformer` (transformers imported lazily)."""
    from transformers import Blip2QFormerConfig  # lazy: transformers' BLIP-2 classes take seconds; export only

    c = model.Qformer.config
    return Blip2QFormerConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        hidden_act=c.hidden_act,
        hidden_dropout_prob=c.hidden_dropout_prob,
        attention_probs_dropout_prob=c.attention_probs_dropout_prob,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        layer_norm_eps=c.layer_norm_eps,
        pad_token_id=c.pad_token_id,
        cross_attention_frequency=c.cross_attention_freq,
        encoder_hidden_size=c.encoder_width,
        use_qformer_text_input=True,
    )


def hf_retrieval_config(model):
    """`Blip2Config` for `Blip2ForImageTextRetrieval`; only an EVA-style encoder maps onto HF's vision model."""
    from transformers import Blip2Config, Blip2VisionConfig  # lazy: as in hf_qformer_config

    vit = model.visual_encoder
    if not isinstance(vit, EvaVisionTransformer):
        raise ValueError(
            f"HF Blip2ForImageTextRetrieval needs an EVA ViT (model.vit_model=eva_clip_g); got {type(vit).__name__}. "
            "Export the Q-Former alone instead (qformer_only=True)."
        )
    block = vit.blocks[0]
    eps = block.norm1.eps
    if abs(model.ln_vision.eps - eps) > 0:
        log.warning("HF uses one layer_norm_eps (%g) for the ViT blocks and ln_vision (ours: %g)", eps, model.ln_vision.eps)
    vision = Blip2VisionConfig(
        hidden_size=vit.num_features,
        intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=block.attn.num_heads,
        image_size=vit.patch_embed.img_size,
        patch_size=vit.patch_embed.patch_size,
        layer_norm_eps=eps,
        qkv_bias=True,
    )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=hf_qformer_config(model).to_dict(),
        num_query_tokens=model.query_tokens.shape[1],
        image_text_hidden_size=model.vision_proj.out_features,
    )


def export_hf(model, out_dir: str | Path, qformer_only: bool = False) -> Path:
    """Write a directory `from_pretrained` loads: Blip2ForImageTextRetrieval (EVA) or Blip2QFormerModel."""
    from transformers import Blip2ForImageTextRetrieval, Blip2QFormerModel  # lazy: as in hf_qformer_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if qformer_only:
        hf = Blip2QFormerModel(hf_qformer_config(model))
        converted = qformer_to_hf(state)
    else:
        hf = Blip2ForImageTextRetrieval(hf_retrieval_config(model))
        converted, dropped = to_hf_retrieval(state)
        log.info("not exported (no HF counterpart): %s", sorted({k.split(".")[0] + "." + k.split(".")[1] if "." in k else k for k in dropped}))
    result = hf.load_state_dict(converted, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"HF export mismatch: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    hf.save_pretrained(str(out))
    model.tokenizer.save_pretrained(str(out))
    return out
