"""Image decoding under memory budgets: any file, bytes, PIL image or array to a bounded RGB image.

Memory is bounded by the decode cost read from the file's header, never by its size in bytes.
"""

from __future__ import annotations

import ctypes
import functools
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageMode, UnidentifiedImageError

from zoomvit import config
from zoomvit.errors import ImageLoadError

# Pillow refuses files above twice this many pixels (DecompressionBombError); make that our own limit.
Image.MAX_IMAGE_PIXELS = config.MAX_FILE_PIXELS // 2


@dataclass
class LoadedImage:
    """An RGB image ready for the model, and the size of the file it came from.

    `image` may be downscaled from the file (see config.MAX_IMAGE_SIDE); `scale` = image side / file side, so
    boxes can be reported in the file's own pixels.
    """

    image: Image.Image
    original_size: tuple[int, int]  # (width, height) of the file after EXIF rotation

    @property
    def scale(self) -> float:
        return self.image.width / self.original_size[0]


# Decoders that hold more than the frame buffer itself (peak / buffer, measured at 4000x4000): libwebp and openjpeg
# keep their own full-size copies (4.2x, 4.9x), libtiff a packed buffer for compressed files (1.8x). Others ~1.05x.
_DECODE_OVERHEAD = {"WEBP": 4.5, "JPEG2000": 5.0, "TIFF": 2.0}
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_STRIP_BYTES = 8 << 20  # big images are converted this much (as RGB) at a time
_TRIM_ABOVE = 64 << 20  # decodes smaller than this leave too little behind to be worth a malloc_trim
_TRANSPOSE = {  # EXIF orientation -> the transpose that displays the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def decode_cost(img: Image.Image) -> int:
    """Bytes that decoding the current frame of `img` takes, from its header alone (Image.open reads no pixels)."""
    try:
        mode = ImageMode.getmode(img.mode)
        # Pillow stores every multi-band mode at 4 bytes a pixel (RGB too); single-band modes at their type's size.
        per_pixel = 4 if len(mode.bands) > 1 else np.dtype(mode.typestr).itemsize
    except KeyError:
        per_pixel = 4
    return int(img.width * img.height * per_pixel * _DECODE_OVERHEAD.get(img.format, 1.0))


def fit_size(size: tuple[int, int], max_side: int, min_side: int = 0) -> tuple[int, int]:
    """(width, height) scaled down so the longest side is at most max_side, and scaled up (only) so the shortest
    is at least min_side where max_side allows; at least 1 pixel each, aspect ratio kept."""
    width, height = size
    factor = min(1.0, max_side / max(width, height))
    if min(width, height) * factor < min_side:
        factor = min(min_side / min(width, height), max_side / max(width, height))
    return max(1, round(width * factor)), max(1, round(height * factor))


def _finite_range(arr: np.ndarray):
    finite = arr[np.isfinite(arr)]
    return (float(finite.min()), float(finite.max())) if finite.size else None


def _to_rgb(img: Image.Image, value_range=None) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white so it doesn't turn black.

    16/32-bit and float images are stretched from `value_range` (default: their own finite min and max) to 8 bits,
    as a plain convert("L") clips at 255; a caller converting strip by strip passes the whole image's range.
    """
    if img.mode in _HIGH_BIT_MODES:
        arr = np.array(img, dtype=np.float32)  # float32 halves the float64 copy; NaN -> 0, +-inf -> the range ends
        lo, hi = value_range or _finite_range(arr) or (0.0, 0.0)
        arr -= lo
        arr *= 0.0 if hi <= lo else 255.0 / (hi - lo)
        np.clip(arr, 0.0, 255.0, out=arr)
        if img.mode == "F":
            np.nan_to_num(arr, copy=False)
        img = Image.fromarray(arr.astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _shrink_to_rgb(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """RGB at `size`, converted strip by strip so a big image is never copied at full size.

    Each strip is box-reduced by the largest whole factor that keeps at least `size` (Pillow's thumbnail keeps
    twice the size, but at 12000x12000 that result alone is 144 MB); only the small result is resized with LANCZOS.
    """
    w, h = img.size
    factor = max(1, min(w // size[0], h // size[1]))
    rows = max(1, _STRIP_BYTES // (4 * w) // factor) * factor
    strips = [(0, y, w, min(h, y + rows)) for y in range(0, h, rows)]
    value_range = None
    if img.mode == "F":  # getextrema gives NaN if any pixel is NaN
        ranges = [r for box in strips if (r := _finite_range(np.array(img.crop(box), dtype=np.float32)))]
        value_range = (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else (0.0, 0.0)
    elif img.mode in _HIGH_BIT_MODES:
        value_range = img.getextrema()
    out = Image.new("RGB", (-(-w // factor), -(-h // factor)))
    for box in strips:
        part = _to_rgb(img.crop(box), value_range)
        out.paste(part.reduce(factor) if factor > 1 else part, (0, box[1] // factor))
    return out if out.size == size else out.resize(size, Image.Resampling.LANCZOS)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_memory():
    """Hand freed heap pages back to the OS (glibc; elsewhere a no-op).

    glibc keeps what a big decode or a model run freed in its per-thread arenas, so RSS would stay high.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def load_image(source, max_side: int = config.MAX_IMAGE_SIDE) -> LoadedImage:
    """Open a path, bytes, a PIL image or an HxW(x3/4) array as RGB, with a clear error if it can't.

    Handles EXIF rotation, the first frame of animations, grayscale/RGBA/CMYK/16-bit/palette modes, and
    downscales huge images. Memory is bounded by the decode cost read from the header (config.MAX_DECODE_BYTES):
    JPEGs decode at reduced size (draft mode) and the conversion to RGB never copies a big image whole.
    """
    if source is None:
        raise ImageLoadError("No image given.")
    opened = None
    cost = 0
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below replaces Pillow's decompression-bomb warning and error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                img = source
            elif isinstance(source, np.ndarray):
                arr = source
                if arr.dtype.kind == "f" and arr.size and float(np.nanmax(arr)) <= 1.0:
                    arr = arr * 255.0  # floats in [0, 1]
                img = Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8))
            else:
                if isinstance(source, (bytes, bytearray)):
                    stream = io.BytesIO(source)
                else:
                    stream = Path(source)
                    if not stream.is_file():
                        raise ImageLoadError(f"Image file not found: {stream}")
                img = opened = Image.open(stream)  # reads the header only
            if img.width * img.height > config.MAX_FILE_PIXELS:
                raise ImageLoadError(
                    f"Image is too large ({img.width}x{img.height} pixels); "
                    f"the limit is {config.MAX_FILE_PIXELS:,} pixels."
                )
            img.seek(0)  # first frame of an animated GIF/WebP/TIFF; the others are never decoded
            original_size = img.size
            if max(original_size) / max(1, min(original_size)) > config.MAX_ASPECT_RATIO:
                raise ImageLoadError(
                    f"Image is {original_size[0]}x{original_size[1]}: aspect ratio above "
                    f"{config.MAX_ASPECT_RATIO:g}:1 is not supported."
                )
            size = fit_size(original_size, max_side)
            if opened is not None and size != img.size:
                img.draft(None, size)  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still at least `size`; others: no-op
            cost = decode_cost(img)
            if cost > config.MAX_DECODE_BYTES:
                raise ImageLoadError(
                    f"Image is too large to decode: {original_size[0]}x{original_size[1]} {img.mode} pixels "
                    f"would take about {cost / 1e6:,.0f} MB; the limit is {config.MAX_DECODE_BYTES / 1e6:,.0f} MB."
                )
            img.load()
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)  # PNG may keep EXIF after the pixels
            img = _shrink_to_rgb(img, size)
            if orientation in _TRANSPOSE:
                img = img.transpose(_TRANSPOSE[orientation])  # on the small image: a rotation copies it
                if orientation >= 5:  # 90-degree turns: the "original" is what a viewer shows
                    original_size = original_size[::-1]
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError("Not an image file (or a format Pillow cannot read).") from None
    except Image.DecompressionBombError:
        raise ImageLoadError(f"Image is too large; the limit is {config.MAX_FILE_PIXELS:,} pixels.") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageLoadError(f"Could not read the image: {exc}") from None
    finally:
        if opened is not None:
            opened.close()  # frees the full-size decode
        if cost > _TRIM_ABOVE:
            release_memory()
    return LoadedImage(img, tuple(original_size))
