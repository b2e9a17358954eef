"""What runs in each stage of the CapFilt job, usable without Ray (the plain loop of the bench, the tests).

- `decode_batch` (CPU tasks): each image decoded in try/except and turned into both models' pixel inputs
  by their own image processors (resize, crop, normalise); an image that does not decode is marked, not
  dropped: it is written again with its original caption(s) only.
- `Captioner` (actor): the captioning model, `num_captions` captions per image by seeded nucleus sampling
  (qformer.data.capfilt.sampling), BLIP's CapFilt prompt "a picture of " stripped from them.
- `Scorer` (actor): the CLIP model, cosine similarity of the image and each candidate; keeps the top ones
  (qformer.data.capfilt.ranking).
Models load through transformers by hub name or local path (a hub name from the local cache when the hub is
off: HF_HUB_OFFLINE=1); fp16 on a GPU, fp32 on a CPU.
"""
from __future__ import annotations

import json

import numpy as np

from qformer.core.errors import ConfigError, ImageDecodeError
from qformer.data.capfilt.ranking import candidates, keep_top
from qformer.data.images import DEFAULT_MAX_PIXELS, load_rgb

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"
DEFAULT_SCORER = "openai/clip-vit-large-patch14"
DEFAULT_PROMPT = "a picture of "  # BLIP's captioner prompt (LAVIS blip_caption), removed from the captions


def load_processor(name: str, role: str):
    """The model's processor (image processor + tokenizer); a one-line ConfigError naming the model and how to
    get it when it cannot be loaded here (checked on the driver, before any actor starts)."""
    from transformers import AutoConfig, AutoProcessor  # lazy: the command module imports this package

    try:
        AutoConfig.from_pretrained(name)
        return AutoProcessor.from_pretrained(name)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"cannot load '{name}' here ({first}); fetch it once where the hub is reachable "
                          f"(`hf download {name}` into the HF_HOME every node sees, then HF_HUB_OFFLINE=1) or "
                          "give a local directory saved with save_pretrained", f"--{role}") from None


def _device_dtype():
    import torch  # lazy: see load_processor

    return ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)


def decode_batch(batch: dict[str, np.ndarray], captioner_images, scorer_images,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """Adds `ok` (bool), `cap_pixels` and `clip_pixels` (float32 [n,3,H,W]); `data` empty: open `name`."""
    from PIL import Image

    cap, clip, ok = [], [], []
    blank = Image.new("RGB", (8, 8))
    for name, data, index in zip(batch["name"], batch["data"], batch["index"]):
        img = None
        if int(index) >= 0:  # index -1: the row that stands for a shard with no samples
            try:
                img = load_rgb(str(name), max_pixels, data=bytes(data) if len(data) else None)
            except ImageDecodeError:
                img = None
        ok.append(img is not None)
        cap.append(captioner_images(images=img or blank, return_tensors="np")["pixel_values"][0])
        clip.append(scorer_images(images=img or blank, return_tensors="np")["pixel_values"][0])
    return {**batch, "ok": np.asarray(ok, bool), "cap_pixels": np.stack(cap).astype(np.float32),
            "clip_pixels": np.stack(clip).astype(np.float32)}


class Captioner:
    """`num_captions` captions per decoded image, seeded per sample; adds `generated` (JSON list per row)."""

    def __init__(self, name: str, num_captions: int = 10, top_p: float = 0.9, prompt: str = DEFAULT_PROMPT,
                 max_new_tokens: int = 30, min_new_tokens: int = 5) -> None:
        import torch
        from transformers import AutoModelForImageTextToText

        self.device, dtype = _device_dtype()
        self.model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype).to(self.device).eval()
        self.tokenizer = load_processor(name, "captioner").tokenizer
        self.n, self.top_p, self.prompt = int(num_captions), float(top_p), prompt
        self.lengths = {"max_new_tokens": int(max_new_tokens), "min_new_tokens": int(min_new_tokens)}
        self.torch = torch

    def captions(self, pixels: np.ndarray, seeds: np.ndarray) -> list[list[str]]:
        from transformers import LogitsProcessorList

        from qformer.data.capfilt.sampling import SeededTopP, row_seeds

        torch = self.torch
        if not len(pixels):
            return []
        inputs = {"pixel_values": torch.as_tensor(pixels, device=self.device, dtype=self.model.dtype)}
        if self.prompt:
            prompt = self.tokenizer([self.prompt] * len(pixels), return_tensors="pt")
            inputs["input_ids"] = prompt["input_ids"].to(self.device)
        sampler = SeededTopP(row_seeds(seeds, self.n), self.top_p)
        with torch.inference_mode():  # top_k=0, top_p=1, temperature=1: the sampler's draw is the only choice left
            out = self.model.generate(**inputs, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                      num_return_sequences=self.n, logits_processor=LogitsProcessorList([sampler]),
                                      **self.lengths)
        texts = [self._strip(t) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return [texts[i * self.n:(i + 1) * self.n] for i in range(len(pixels))]

    def _strip(self, text: str) -> str:
        head = self.prompt.strip()
        text = text.strip()
        return text[len(head):].strip() if head and text.lower().startswith(head.lower()) else text

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], bool)
        made = iter(self.captions(batch["cap_pixels"][ok], np.asarray(batch["seed"], np.int64)[ok]))
        generated = [json.dumps(next(made)) if good else "[]" for good in ok]
        return {**{k: v for k, v in batch.items() if k != "cap_pixels"}, "generated": np.asarray(generated, object)}


class Scorer:
    """CLIP similarity of each image with its candidates; adds `kept` (ranking.Kept as JSON, "" when not decoded)."""

    def __init__(self, name: str, keep: int = 2) -> None:
        import torch
        from transformers import AutoModel

        self.device, dtype = _device_dtype()
        self.model = AutoModel.from_pretrained(name, dtype=dtype).to(self.device).eval()
        self.tokenizer = load_processor(name, "scorer").tokenizer
        self.keep, self.torch = int(keep), torch
        text_cfg = getattr(self.model.config, "text_config", self.model.config)
        self.max_text = int(getattr(text_cfg, "max_position_embeddings", 77))  # CLIP's 77 tokens

    def scores(self, pixels: np.ndarray, texts: list[list[str]]) -> list[np.ndarray]:
        """Per image, the cosine similarity with each of its texts."""
        torch = self.torch
        flat = [t for ts in texts for t in ts]
        if not len(pixels) or not flat:
            return [np.zeros(len(ts)) for ts in texts]
        with torch.inference_mode():
            image = _features(self.model.get_image_features(
                pixel_values=torch.as_tensor(pixels, device=self.device, dtype=self.model.dtype)))
            tokens = self.tokenizer(flat, padding=True, truncation=True, max_length=self.max_text,
                                    return_tensors="pt").to(self.device)
            text = _features(self.model.get_text_features(**tokens))
            image = torch.nn.functional.normalize(image.float(), dim=-1)
            text = torch.nn.functional.normalize(text.float(), dim=-1)
        owner = torch.as_tensor(np.repeat(np.arange(len(texts)), [len(ts) for ts in texts]), device=image.device)
        sims = (image[owner] * text).sum(-1).cpu().numpy()
        return np.split(sims, np.cumsum([len(ts) for ts in texts])[:-1])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], bool)
        cands = [candidates(json.loads(o), json.loads(g)) for o, g, good in
                 zip(batch["originals"], batch["generated"], ok) if good]
        sims = iter(self.scores(batch["clip_pixels"][ok], [texts for texts, _ in cands]))
        cands = iter(cands)
        kept = []
        for good in ok:
            if not good:
                kept.append("")
                continue
            texts, n_original = next(cands)
            kept.append(keep_top(texts, next(sims), n_original, self.keep).to_json())
        drop = {"clip_pixels", "generated"}
        return {**{k: v for k, v in batch.items() if k not in drop}, "kept": np.asarray(kept, object)}


def _features(out):
    """get_*_features returns the projected tensor, or (transformers 5) an output whose pooler_output it is."""
    return getattr(out, "pooler_output", out)
