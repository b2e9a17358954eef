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

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

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
    return img if img.mode == "RGB" else img.convert("RGB")  # convert copies even an RGB image


def load_rgb(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS, *,
             data: bytes | None = None, endpoint: str | None = None) -> Image.Image:
    """Decode `path` (or the encoded bytes `data`, a shard member that `path` names) fully into an RGB
    PIL image; any failure becomes ImageDecodeError(path, reason)."""
    return open_encoded(path, max_pixels, data=data, endpoint=endpoint).decode()


# Orientations (EXIF 0x0112) that turn the stored picture by 90 degrees: width and height swap.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


class EncodedImage:
    """An image whose header is read and checked but whose pixels are not decoded yet, so that a
    processor can ask for a smaller JPEG decode (libjpeg's DCT scaling, PIL's `draft`) once it knows
    which part of the picture it keeps. `size` is the upright (EXIF-oriented) size."""

    def __init__(self, path: str, image: Image.Image) -> None:
        self.path, self._image = path, image
        orientation = image.getexif().get(0x0112, 1)
        w, h = image.size
        self.size = (h, w) if orientation in _TRANSPOSED_ORIENTATIONS else (w, h)

    def decode(self) -> Image.Image:
        """Every pixel, as LAVIS's `Image.open(path).convert("RGB")` (plus the fixes in this module's doc)."""
        return self.decode_reduced(1)[0]

    def decode_reduced(self, factor: int) -> tuple[Image.Image, int]:
        """The RGB image decoded at 1/`factor` of its size (1, 2, 4 or 8) where the format allows it (JPEG),
        else whole; returns it with the factor applied, which maps a box on `size` to the result by division."""
        with _decode_errors(self.path):
            img = self._image
            applied = 1
            if factor > 1 and img.format == "JPEG":
                w, h = img.size
                drafted = img.draft(None, (max(1, w // factor), max(1, h // factor)))
                if drafted is not None:  # (mode, (0, 0, w / scale, h / scale)); None: PIL declined
                    applied = round(w / drafted[1][2])
            img.load()  # decode now: truncated data fails here, not later in a transform
            ImageOps.exif_transpose(img, in_place=True)  # in place: a copy of the whole picture costs ~0.7 ms
            return _to_rgb(img), applied


def open_encoded(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS, *,
                 data: bytes | None = None, endpoint: str | None = None) -> EncodedImage:
    """Read `path` (or take `data`) and its header, without decoding pixels; checks as `load_rgb`."""
    path = str(path)
    with _decode_errors(path):
        if data is None:
            data = read_bytes(path, endpoint) if "://" in path else Path(path).read_bytes()
        if len(data) == 0:
            raise ImageDecodeError(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        if max_pixels and img.width * img.height > max_pixels:
            raise ImageDecodeError(
                path,
                f"{img.width}x{img.height} = {img.width * img.height} pixels exceeds the "
                f"decompression-bomb limit of {max_pixels} pixels",
            )
        return EncodedImage(path, img)


@contextlib.contextmanager
def _decode_errors(path: str) -> Iterator[None]:
    """Any failure to read or decode becomes ImageDecodeError(path, why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
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
