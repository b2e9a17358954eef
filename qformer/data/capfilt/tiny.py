"""Random few-layer captioner (BLIP) and scorer (CLIP) directories, saved with save_pretrained: what the tests,
`qformer bench capfilt` and offline trials run CapFilt with. Their captions are random word sequences and
their scores random, but every code path (generate, processors, tokenizers, CLIP features) is the real one."""
from __future__ import annotations

import string
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_captioner(root: str | Path, words: list[str], *, image_size: int = 32, seed: int = 0) -> Path:
    """A BlipForConditionalGeneration (2 vision, 2 text layers, 32 wide) whose BERT vocabulary is `words`
    (plus BERT's special tokens, `[DEC]` and the prompt's words), with its BlipProcessor."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vocab = list(dict.fromkeys([*SPECIAL, "a", "picture", "of", *words]))
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(root / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    (root / "vocab.txt").unlink()
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = BlipConfig(
        text_config={**small, "vocab_size": len(tokenizer), "encoder_hidden_size": 32, "max_position_embeddings": 64,
                     "bos_token_id": tokenizer.bos_token_id, "sep_token_id": tokenizer.sep_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**small, "image_size": image_size, "patch_size": 8})
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(str(root))
    images = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(images, tokenizer).save_pretrained(str(root))
    return root


def write_tiny_scorer(root: str | Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """A CLIPModel (2 + 2 layers, 32 wide, 16-d projection) with a character-level byte-BPE tokenizer (no
    merges: lowercase letters and digits, the rest unknown) and its CLIPProcessor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root = Path(root)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**small, "vocab_size": len(vocab), "max_position_embeddings": 77, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={**small, "image_size": image_size, "patch_size": 8}, projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(str(root))
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(images, tokenizer).save_pretrained(str(root))
    return root
