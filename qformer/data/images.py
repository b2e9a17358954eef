"""Open any image file as 8-bit RGB, or raise ImageDecodeError saying why.

LAVIS does `Image.open(path).convert("RGB")`. We do that too, plus four things a real crawl needs:
- EXIF orientation is applied (a phone photo's captions describe the upright picture);
- 16-bit images are scaled to 8 bits (PIL's convert would clip them to white);
- transparent images are composited on white (convert would show the hidden colour of
  fully transparent pixels, often black);
- the decompression-bomb guard is an explicit pixel limit with a clear message, checked
  from the header before any pixel is decoded.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qformer.core.errors import ImageDecodeError
from qformer.data.storage import read_bytes

# Pillow's own default (about 89.5 Mpx); Pillow raises DecompressionBombError at twice this.
DEFAULT_MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT:
        arr = np.asarray(img, dtype=np.uint32 if img.mode == "I" else np.uint16)
        # 16-bit PNGs open as "I;16" or "I" (0..65535): keep the top 8 bits
        img = Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS, *,
             data: bytes | None = None, endpoint: str | None = None) -> Image.Image:
    """Decode `path` (or the encoded bytes `data`, a shard member that `path` names) fully into an RGB
    PIL image; any failure becomes ImageDecodeError(path, reason)."""
    path = str(path)
    try:
        if data is None and "://" in path:  # an object-storage image root
            data = read_bytes(path, endpoint)
        if (len(data) if data is not None else os.path.getsize(path)) == 0:
            raise ImageDecodeError(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if data is not None else path) as img:
                if max_pixels and img.width * img.height > max_pixels:
                    raise ImageDecodeError(
                        path,
                        f"{img.width}x{img.height} = {img.width * img.height} pixels exceeds the "
                        f"decompression-bomb limit of {max_pixels} pixels",
                    )
                img.load()  # decode now: truncated data fails here, not later in a transform
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(path, f"rejected by Pillow's decompression-bomb guard: {err}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not a recognised image format") from None
    except Exception as err:  # truncated/corrupt data; Pillow plugins raise many types (struct.error, ...)
        raise ImageDecodeError(path, f"cannot decode: {type(err).__name__}: {err}") from None
