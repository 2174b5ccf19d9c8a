"""Robust image loading: every supported input becomes (H, W, 3) uint8 RGB, or a clear error.

Grayscale is replicated to 3 channels, alpha is composited away (dropped), 16-bit images are
scaled to 8 bits, 32-bit float images (TIFF mode "F") are read as 0-1 when their maximum is at most 2
and as 0-255 otherwise (as :func:`to_rgb_uint8` reads float arrays), and EXIF orientation is applied so
masks line up with what a viewer shows.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segany.errors import ImageLoadError, InputError


def float_to_uint8(arr: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] as uint8, truncating ``x·255`` as the reference's ``set_image`` does (through
    torchvision's ``to_pil_image``), so float input gives the reference's pixels; values outside are clipped."""
    return np.clip(np.asarray(arr, dtype=np.float64) * 255.0, 0, 255).astype(np.uint8)


# A float image whose maximum is at most this is read as 0–1 (see to_rgb_uint8). A 0–255 image with no value
# above 2 is black to the eye (2/255), so the margin costs nothing real.
FLOAT_01_MAX = 2.0


def to_rgb_uint8(image: np.ndarray, what: str = "image") -> np.ndarray:
    """Normalize an array image to (H, W, 3) uint8.

    Accepts (H, W), (H, W, 1), (H, W, 3) and (H, W, 4) of uint8, uint16, bool or float. A float image whose
    largest value is at most :data:`FLOAT_01_MAX` is taken as 0–1 (values outside clipped), a larger one as
    0–255. The margin above 1 is for 0–1 images that a bicubic or Lanczos resize left a little above 1.0:
    with the line at 1.0, one pixel at 1.0001 made the whole image be read as 0–255, almost black.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InputError(f"{what} must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {arr.shape}; "
                         "pass an HWC image array")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(f"{what} is empty (shape {arr.shape})")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.uint16:
        arr = (arr.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError(f"{what} contains NaN or infinite values")
        hi = float(arr.max()) if arr.size else 0.0
        arr = float_to_uint8(arr if hi <= FLOAT_01_MAX else arr / 255.0)
    else:
        raise InputError(f"{what} has dtype {arr.dtype}; expected uint8, uint16 or float")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def _max_pixels() -> int:
    """The largest image to decode: PIL's bomb guard fires at twice ``Image.MAX_IMAGE_PIXELS`` (about 179 M
    pixels by default); ``SEGANY_MAX_IMAGE_PIXELS`` changes it, for trusted gigapixel scans and mosaics."""
    text = os.environ.get("SEGANY_MAX_IMAGE_PIXELS", "").strip()
    if not text:
        return 2 * int(Image.MAX_IMAGE_PIXELS or 0) or 2**62
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise InputError(f"SEGANY_MAX_IMAGE_PIXELS={text!r} is not a positive whole number of pixels; "
                         "set it to e.g. 400000000, or unset it")
    return value


@contextmanager
def _pixel_limit(limit: int) -> Iterator[None]:
    """PIL refuses images above twice its global limit: set that for one open, then restore it."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit // 2
    try:
        with warnings.catch_warnings():  # between 1x and 2x PIL only warns; the limit above is the one we mean
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def load_image(path: str | os.PathLike[str], *, apply_exif: bool = True) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB.

    ``apply_exif=False`` keeps the stored pixel frame: packing needs it for an EXIF-rotated image whose
    masks were drawn on the stored pixels, so the masks stay on the pixels they outline.
    """
    p = Path(path)
    if not p.exists():
        raise ImageLoadError(f"image {str(p)!r} does not exist")
    if p.is_dir():
        raise ImageLoadError(f"{str(p)!r} is a folder, not an image file")
    return _decode(p, str(p), apply_exif)


def load_image_bytes(data: bytes, name: str, *, apply_exif: bool = True) -> np.ndarray:
    """:func:`load_image` for an image file's bytes already in memory (``name`` is what messages call it).

    Why: the data engine checks a file's sha256 on the bytes it read, and must decode those same bytes rather
    than reopen a path whose file may have changed in between, or write them to a temporary file first.
    """
    return _decode(io.BytesIO(data), name, apply_exif)


def _decode(source: Path | io.BytesIO, name: str, apply_exif: bool) -> np.ndarray:
    limit = _max_pixels()
    try:
        with _pixel_limit(limit), Image.open(source) as im:
            if apply_exif:
                im = ImageOps.exif_transpose(im)
            if im.mode == "F":  # convert("RGB") would clip the floats to 0-255: a 0-1 image came out black
                arr = np.asarray(im, dtype=np.float32)
            elif im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                arr = np.asarray(im, dtype=np.int64 if im.mode == "I" else np.uint16)
                if arr.dtype == np.int64:  # mode I is signed 32-bit: read as 16-bit, out-of-range values clipped
                    arr = np.clip(arr, 0, 65535).astype(np.uint16)
            else:
                if im.mode in ("RGBA", "LA", "P", "PA"):
                    im = im.convert("RGBA").convert("RGB")
                elif im.mode != "RGB":
                    im = im.convert("RGB")
                arr = np.asarray(im)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{name!r} has more pixels than the {limit:,} segany opens (a guard against "
                             "decompression bombs); downscale it, or raise the limit with "
                             "SEGANY_MAX_IMAGE_PIXELS=<pixels> if you trust the file") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"could not read {name!r} as an image ({exc}); pass a JPEG, PNG, TIFF, BMP or WebP file"
                             ) from exc
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ImageLoadError(f"{name!r} is a floating-point image with NaN or infinite pixels; replace them "
                             "(e.g. numpy.nan_to_num) and save it again, or convert it to 8 or 16 bits")
    # Float pixels follow to_rgb_uint8's rule, so a file and the same array passed in give one picture: an
    # image whose maximum is at most 1 is 0-1, any other is 0-255; values outside are clipped.
    return to_rgb_uint8(arr, name)
