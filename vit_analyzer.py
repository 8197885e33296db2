"""Model loading, one cached analysis pass (attentions + their gradients), and every importance map.

Data flows one way: image -> `load_image` -> `analyze` (one forward, one backward) -> `Analysis` maps.
Zoom, pruning, the app and the CLI all read from the same `Analysis`.
"""

from __future__ import annotations

import ctypes
import functools
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageMode, UnidentifiedImageError

import backbones
import config


# Pillow refuses files above twice this many pixels (DecompressionBombError); make that our own limit.
Image.MAX_IMAGE_PIXELS = config.MAX_FILE_PIXELS // 2


class ZoomViTError(Exception):
    """An error a user can act on; the app and the CLI show its message as is, without a traceback."""


class ImageLoadError(ZoomViTError):
    pass


class ModelLoadError(ZoomViTError):
    pass


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ViTBundle:
    """A loaded classifier and the facts about its token layout that every map needs."""

    model: torch.nn.Module
    processor: object
    name: str
    patch_size: int
    input_size: tuple[int, int]  # (height, width) the model was trained at
    num_special: int  # CLS (+ distillation token for distilled DeiT)
    id2label: dict
    device: torch.device = torch.device("cpu")  # where the model's weights are (load_model moves them there)
    dtype: torch.dtype = torch.float32  # the weights' precision; inputs are cast to it, outputs back to float32

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def place(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Model input on the model's device, in its precision (no copy when it already is)."""
        return pixel_values.to(self.device, self.dtype)

    @functools.cached_property
    def adapter(self) -> backbones.Backbone:
        """Everything that depends on the model family (see backbones.py)."""
        return backbones.adapter_for(self.model)

    @property
    def backbone(self):
        return self.model.base_model

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def num_heads(self) -> int:
        return self.adapter.num_heads

    def label(self, index: int) -> str:
        return str(self.id2label.get(int(index), f"class {int(index)}"))

    def find_label(self, text: str) -> int:
        return match_label(self.id2label, text)


def match_label(id2label: dict, text) -> int:
    """A class index from an index, an exact label, or a unique case-insensitive substring of a label.

    id2label may have int keys (a loaded model) or str keys (config.json read as JSON), so the CLI can check
    --target before the weights load."""
    labels = {int(i): str(name) for i, name in id2label.items()}
    text = str(text).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < len(labels):
            raise ZoomViTError(f"Class index {index} is out of range (0..{len(labels) - 1}).")
        return index
    lowered = text.lower()

    def one_of(indices):  # a name that several classes share (ImageNet has two "crane"s): ask, never guess
        listed = ", ".join(f"'{labels[i]}' [{i}]" for i in indices[:5])
        raise ZoomViTError(f"'{text}' names {len(indices)} classes: {listed}; give the class index to choose.")

    exact = [i for i, name in labels.items() if name.lower() == lowered]
    if len(exact) == 1:
        return exact[0]
    if exact:
        one_of(exact)
    names = [(i, n.lower()) for i, n in labels.items()]
    # Prefer a match on a whole comma-separated synonym ("tench" in "tench, Tinca tinca").
    whole = [i for i, n in names if lowered in [s.strip() for s in n.split(",")]]
    if len(whole) == 1:
        return whole[0]
    if whole:
        one_of(whole)
    partial = [i for i, n in names if lowered in n]
    if len(partial) == 1:
        return partial[0]
    if not partial:
        raise ZoomViTError(f"No class label matches '{text}'.")
    examples = ", ".join(labels[i] for i in partial[:5])
    raise ZoomViTError(f"'{text}' matches {len(partial)} labels (e.g. {examples}); be more specific.")


_LOCAL_HINT = f"pass a local folder with --model PATH or {config.MODEL_ENV_VAR}=PATH"


def _first_line(exc: BaseException) -> str:
    """An exception's first non-empty line, whole: hub errors run over several lines; none is cut mid-word."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick request to the hub endpoint: the download path retries for minutes when the hub is down."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # DNS failure, refused connection, timeout, proxy error: whatever the transport raises
        return False
    return True


def _local_folder(name: str) -> Path | None:
    """The folder `name` points at, None for a hub id; ModelLoadError for a path that is not a folder."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ModelLoadError(f"Model path is a file, not a folder: {name}")
    if name.startswith((".", "/", "~")):
        raise ModelLoadError(f"Model folder not found: {name}")
    return None


def read_model_config(name: str | None = None) -> dict | None:
    """The model's config.json as a dict, read without loading anything, and checked to be a supported
    classifier that needs no remote code. From a local folder or the hub cache; None for a hub id not in it."""
    name = config.resolve_model_name(name)
    if name.startswith(TIMM_PREFIX):  # checked when timm loads it
        return None
    folder = _local_folder(name)
    if folder is not None:
        path = folder / "config.json"
        if not path.is_file():
            raise ModelLoadError(
                f"Could not load model '{name}': the folder has no config.json (a model folder in Hugging Face "
                "layout holds config.json, model.safetensors and preprocessor_config.json)."
            )
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            path = try_to_load_from_cache(name, "config.json")
        except ValueError:  # HFValidationError: not a repo id either
            raise ModelLoadError(f"Model folder not found, and not a valid hub id either: {name}") from None
        if not isinstance(path, str):
            return None
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"Could not read the config.json of model '{name}': {_first_line(exc)}") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"The config.json of model '{name}' is not a JSON object.")
    _check_model_config(name, cfg)
    return cfg


def _model_type(cfg: dict) -> str | None:
    """The config's model_type; a folder in timm's hub layout has none, and transformers loads it as
    TimmWrapperForImageClassification ("timm_wrapper")."""
    if "model_type" not in cfg and "architecture" in cfg and "pretrained_cfg" in cfg:
        return "timm_wrapper"
    return cfg.get("model_type")


def _check_model_config(name: str, cfg: dict) -> None:
    if cfg.get("auto_map"):
        raise ModelLoadError(
            f"Could not load model '{name}': it needs custom code from its repository (auto_map in config.json), "
            "and ZoomViT never runs remote code."
        )
    model_type = _model_type(cfg)
    if model_type not in backbones.FAMILIES:
        kind = f"a '{model_type}' model" if model_type else "a model without a model_type in config.json"
        raise ModelLoadError(
            f"Could not load model '{name}': it is {kind}; ZoomViT supports only {backbones.supported_families()} "
            "image classifiers."
        )


def _check_local_weights(name: str, folder: Path, needs_preprocessor: bool = True) -> None:
    """Safetensors weights present and readable; pickle weights are refused (unpickling can run code). A timm
    folder keeps its preprocessing in config.json (needs_preprocessor=False)."""
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        if pickles:
            raise ModelLoadError(
                f"Could not load model '{name}': the folder has only PyTorch pickle weights ({', '.join(pickles)}), "
                "which ZoomViT does not load because unpickling a file can run arbitrary code; if you trust it, "
                "convert it once with transformers (from_pretrained, then save_pretrained writes model.safetensors)."
            )
        raise ModelLoadError(f"Could not load model '{name}': the folder has no weights (model.safetensors).")
    from safetensors import safe_open

    for shard in shards:
        try:
            with safe_open(shard, framework="pt"):  # parses the header and checks it covers the whole file
                pass
        except Exception as exc:  # SafetensorError derives from Exception only
            raise ModelLoadError(
                f"Could not load model '{name}': {shard.name} is corrupt or incomplete ({_first_line(exc)})."
            ) from None
    if needs_preprocessor and not (folder / "preprocessor_config.json").is_file():
        raise ModelLoadError(
            f"Could not load model '{name}': the folder has no preprocessor_config.json (the image preprocessing)."
        )


def resolve_device(device=None) -> torch.device:
    """The device named by `device` (None: $ZOOMVIT_DEVICE, else auto): auto, cpu, cuda, cuda:N, mps or a
    torch.device. auto is cuda if torch sees a GPU, else mps if available, else cpu. A device that does not exist
    here is a ZoomViTError, not a failure deep inside the first forward pass."""
    given = str(device) if isinstance(device, torch.device) else config.resolve_device_name(device)
    name = given.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    kind, _, index = name.partition(":")
    if kind not in config.DEVICES[1:] or (index and not (kind == "cuda" and index.isdigit())):
        raise ZoomViTError(
            f"Unknown device '{given}': use auto, cpu, cuda, cuda:N or mps (--device or ${config.DEVICE_ENV_VAR})."
        )
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ZoomViTError(f"Device '{given}' is not available: torch sees no CUDA GPU here; use --device cpu.")
        if index and int(index) >= torch.cuda.device_count():
            raise ZoomViTError(
                f"Device '{given}' does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s), "
                f"cuda:0..cuda:{torch.cuda.device_count() - 1}."
            )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ZoomViTError(f"Device '{given}' is not available: torch sees no Apple GPU (MPS) here; use --device cpu.")
    return torch.device(name)


def resolve_dtype(dtype=None, device=None) -> torch.dtype:
    """The precision named by `dtype` (None: $ZOOMVIT_DTYPE, else float32; or a torch.dtype) for a model on
    `device` (as resolve_device takes it). float16 is refused on the CPU: torch runs it there without half-precision
    hardware (DeiT-Tiny's forward took 5x as long as in float32 on the 2-core dev machine), and it overflows above
    65504 where bfloat16 keeps float32's range. bfloat16 is the CPU's low-precision choice (as slow here, fast on
    CPUs with bfloat16 instructions); float16 is for GPUs."""
    given = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else config.resolve_dtype_name(dtype)
    name = given.strip().lower()
    if name not in config.DTYPES:
        raise ZoomViTError(
            f"Unknown dtype '{given}': use {', '.join(config.DTYPES)} (--dtype or ${config.DTYPE_ENV_VAR})."
        )
    if name == "float16" and resolve_device(device).type == "cpu":
        raise ZoomViTError("float16 runs on a GPU only (cuda or mps); on the CPU use bfloat16 or float32.")
    return getattr(torch, name)


def load_model(name: str | None = None, device=None, dtype=None) -> ViTBundle:
    """Load a classifier of a family with an adapter (backbones.FAMILIES; others would load but give wrong maps and
    pruning, so they are refused up front) from a local folder or a hub id, safetensors weights only, with eager
    attention (the model's own attentions stay available to check the adapter's against), on `device` in `dtype`
    (see resolve_device and resolve_dtype; None: $ZOOMVIT_DEVICE / $ZOOMVIT_DTYPE, else auto / float32). Every
    failure is a one-line ZoomViTError (ModelLoadError for the model itself)."""
    name = config.resolve_model_name(name)
    device = resolve_device(device)  # a bad device or dtype fails before anything loads
    dtype = resolve_dtype(dtype, device)
    if name.startswith(TIMM_PREFIX):
        return _load_with_timm(name, device, dtype)
    folder = _local_folder(name)
    cfg = read_model_config(name)
    timm_layout = cfg is not None and _model_type(cfg) == "timm_wrapper"
    if folder is not None:
        _check_local_weights(name, folder, needs_preprocessor=not timm_layout)
        source, local_only = str(folder), True
    else:
        # Offline or unreachable, only the cache can serve; say so at once rather than after the hub's retries.
        local_only = _hub_offline() or not _hub_reachable()
        if local_only and cfg is None:
            why = "offline (HF_HUB_OFFLINE is set)" if _hub_offline() else "the Hugging Face hub is unreachable"
            raise ModelLoadError(f"Could not load model '{name}': {why} and it is not in the local cache; {_LOCAL_HINT}")
        source = name
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # missing weights are reported below, in one line, not as a log table
    try:
        if cfg is None:  # a hub id fetched now: check its config before downloading the weights
            from huggingface_hub import hf_hub_download

            cfg = json.loads(Path(hf_hub_download(name, "config.json")).read_text("utf-8"))
            _check_model_config(name, cfg)
            timm_layout = _model_type(cfg) == "timm_wrapper"
        if timm_layout:  # timm's own evaluation transform, from the pretrained_cfg in config.json
            processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
            processor = backbones.TimmPreprocessor(processor.data_config)
        else:  # PIL, not torchvision: the same pixels whether or not torchvision is installed
            processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only, backend="pil")
        model, info = AutoModelForImageClassification.from_pretrained(
            source, attn_implementation="eager", use_safetensors=True, local_files_only=local_only,
            output_loading_info=True,
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # hub, file and transformers errors alike: report the cause in one line
        raise ModelLoadError(f"Could not load model '{name}': {_first_line(exc)}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = info.get("missing_keys") or []
    if missing:  # transformers would run these tensors randomly initialised
        raise ModelLoadError(
            f"Could not load model '{name}': its weights do not match its config ({len(missing)} tensors missing, "
            f"e.g. {sorted(missing)[0]})."
        )
    return _bundle(name, model, processor, dict(model.config.id2label), device, dtype)


def _bundle(name: str, model, processor, id2label: dict, device: torch.device, dtype: torch.dtype) -> ViTBundle:
    model.eval()
    try:
        adapter = backbones.adapter_for(model)
    except ValueError as exc:
        raise ModelLoadError(f"Could not load model '{name}': it is {exc}.") from None
    try:
        model.to(device=device, dtype=dtype)
    except (RuntimeError, TypeError) as exc:  # out of GPU memory, a dtype the device lacks
        raise ModelLoadError(f"Could not move model '{name}' to {device} in {dtype}: {_first_line(exc)}") from None
    bundle = ViTBundle(
        model, processor, name, adapter.patch_size, adapter.input_size, adapter.num_prefix, id2label, device, dtype
    )
    bundle.adapter = adapter
    return bundle


TIMM_PREFIX = "timm:"


def _timm_files(name: str, target: str) -> tuple[Path, Path]:
    """(config.json, model.safetensors) of `timm:<folder>` or `timm:<model name>` (its hub repository, from the
    cache when offline), checked like any model folder."""
    folder = _local_folder(target)
    if folder is not None:
        _check_local_weights(name, folder, needs_preprocessor=False)
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"Could not load model '{name}': the folder has no config.json (timm's hub layout "
                                 "holds config.json with 'architecture' and model.safetensors).")
        return folder / "config.json", folder / "model.safetensors"
    import timm

    vit_names = set(timm.list_models(module="vision_transformer")) | set(timm.list_models(module="deit"))
    architecture = target.split(".")[0]
    if architecture not in vit_names:
        known = "an unknown timm model" if not timm.is_model(architecture) else f"timm's '{architecture}'"
        raise ModelLoadError(f"Could not load model '{name}': it is {known}; ZoomViT supports timm's "
                             "VisionTransformer family (vit_*, deit_*, deit3_*, ...).")
    pretrained = timm.models.get_pretrained_cfg(target)
    repo = pretrained.hf_hub_id if pretrained else None
    if not repo:
        raise ModelLoadError(f"Could not load model '{name}': timm knows no pretrained weights on the hub for it.")
    from huggingface_hub import hf_hub_download

    local_only = _hub_offline() or not _hub_reachable()
    try:
        return tuple(Path(hf_hub_download(repo, file, local_files_only=local_only))
                     for file in ("config.json", "model.safetensors"))
    except Exception as exc:
        why = "offline and not in the local cache" if local_only else _first_line(exc)
        raise ModelLoadError(f"Could not load model '{name}' ({repo}): {why}; {_LOCAL_HINT}") from None


def _load_with_timm(name: str, device: torch.device, dtype: torch.dtype) -> ViTBundle:
    """`timm:<model name>` or `timm:<folder in timm's hub layout>`, built and loaded by timm itself."""
    try:
        import timm
    except ImportError as exc:
        raise ModelLoadError(f"Could not load model '{name}': timm is not installed ({exc}).") from None
    config_path, weights = _timm_files(name, name[len(TIMM_PREFIX):])
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
        architecture, pretrained_cfg = cfg["architecture"], dict(cfg.get("pretrained_cfg") or {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"Could not load model '{name}': its config.json is not timm's ({_first_line(exc)}).")
    try:
        model = timm.create_model(
            architecture, pretrained=True, num_classes=cfg.get("num_classes", pretrained_cfg.get("num_classes")),
            pretrained_cfg_overlay={**pretrained_cfg, "file": str(weights)}, **cfg.get("model_args", {}),
        )
        processor = backbones.TimmPreprocessor(timm.data.resolve_data_config(model=model))
    except Exception as exc:  # unknown architecture, weights that do not fit it, unsupported preprocessing
        raise ModelLoadError(f"Could not load model '{name}': {_first_line(exc)}") from None
    labels = cfg.get("label_names") or [f"class {i}" for i in range(model.num_classes)]
    return _bundle(name, model, processor, dict(enumerate(labels)), device, dtype)


def layer_index(block, num_layers: int, name: str = "Block") -> int:
    """The library's 0-based layer index of block number `block` (blocks are numbered 1..L; -1: the last), as the
    app, its API and the CLI take it."""
    try:
        number = float(block)
    except (TypeError, ValueError):
        number = math.nan
    if number == -1:
        return num_layers - 1
    if not (number.is_integer() and 1 <= number <= num_layers):
        raise ZoomViTError(f"{name} must be in 1..{num_layers} (or -1 for the last), got {block}.")
    return int(number) - 1


# ----------------------------------------------------------------------------------------------------------
# Geometry: original image pixels <-> model input pixels <-> patch grid
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """The processor resizes the image to `resized` then takes `crop` (left, top, width, height) of it.

    The patch grid tiles the crop. Coordinates below are in the (possibly downscaled) working image unless
    they say "original"; `scale` converts: working = original * scale.
    """

    image_size: tuple[int, int]  # working image (width, height)
    resized: tuple[int, int]  # (width, height) after the processor's resize
    crop: tuple[int, int, int, int]  # (left, top, width, height) in resized pixels; may extend past it (padding)
    patch_size: int
    scale: float = 1.0

    @property
    def grid(self) -> tuple[int, int]:
        return self.crop[3] // self.patch_size, self.crop[2] // self.patch_size

    def _ratio(self):
        return self.resized[0] / self.image_size[0], self.resized[1] / self.image_size[1]

    def image_to_input(self, x: float, y: float) -> tuple[float, float]:
        rx, ry = self._ratio()
        return x * rx - self.crop[0], y * ry - self.crop[1]

    def input_to_image(self, u: float, v: float) -> tuple[float, float]:
        rx, ry = self._ratio()
        return (u + self.crop[0]) / rx, (v + self.crop[1]) / ry

    def pixel_to_patch(self, x: float, y: float) -> tuple[int, int] | None:
        """(row, col) of the patch that shows working-image pixel (x, y); None outside the model's view."""
        u, v = self.image_to_input(x, y)
        col, row = math.floor(u / self.patch_size), math.floor(v / self.patch_size)
        gh, gw = self.grid
        if 0 <= row < gh and 0 <= col < gw and 0 <= x < self.image_size[0] and 0 <= y < self.image_size[1]:
            return row, col
        return None

    def patch_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """The working-image box (x0, y0, x1, y1) that patch (row, col) sees."""
        p = self.patch_size
        x0, y0 = self.input_to_image(col * p, row * p)
        x1, y1 = self.input_to_image((col + 1) * p, (row + 1) * p)
        return x0, y0, x1, y1

    def view_box(self) -> tuple[float, float, float, float]:
        """The part of the working image the model sees at all (centre crop)."""
        x0, y0 = self.input_to_image(0, 0)
        x1, y1 = self.input_to_image(self.crop[2], self.crop[3])
        w, h = self.image_size
        return max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)

    def to_original(self, box):
        return tuple(float(c) / self.scale for c in box)

    def upsample(self, grid_map: np.ndarray) -> np.ndarray:
        """A patch-grid map (or a stack of them) as float32 (..., H, W) over the working image; 0 where the model
        sees nothing. Resizing then pasting is linear and separable, so a cached pair of matrices
        (`upsample_operator`) does it in two products, for a whole stack at once; `upsample_exact` is the
        reference those matrices are read from."""
        maps = np.asarray(grid_map, dtype=np.float32)
        operator = upsample_operator(self)
        if operator is not None:
            return operator[0] @ maps @ operator[1].T
        return np.stack([self.upsample_exact(m) for m in maps]) if maps.ndim == 3 else self.upsample_exact(maps)

    def upsample_exact(self, grid_map: np.ndarray) -> np.ndarray:
        """One map through the processor's geometry in reverse: bilinear resize to the crop, paste, resize."""
        grid_map = np.asarray(grid_map, dtype=np.float32)
        left, top, cw, ch = self.crop
        rw, rh = self.resized
        patch_level = Image.fromarray(grid_map, mode="F").resize((cw, ch), Image.Resampling.BILINEAR)
        frame = np.zeros((rh, rw), dtype=np.float32)
        # Paste the crop-sized map where the crop sits in the resized frame (clipped where the crop pads).
        fx0, fy0 = max(0, left), max(0, top)
        fx1, fy1 = min(rw, left + cw), min(rh, top + ch)
        if fx1 > fx0 and fy1 > fy0:
            frame[fy0:fy1, fx0:fx1] = np.asarray(patch_level)[fy0 - top : fy1 - top, fx0 - left : fx1 - left]
        w, h = self.image_size
        if (rw, rh) == (w, h):
            return frame
        return np.asarray(Image.fromarray(frame, mode="F").resize((w, h), Image.Resampling.BILINEAR))


@functools.lru_cache(maxsize=64)
def upsample_operator(geometry: Geometry):
    """Matrices (A_y: H x rows, A_x: W x cols) with geometry.upsample_exact(G) == A_y @ G @ A_x.T, or None.

    One probe per grid row and per grid column recovers them; checked against `upsample_exact` on a random map,
    None (use it directly) if they do not match. Cached per geometry: the app redraws one image many times.
    """
    gh, gw = geometry.grid
    full = geometry.upsample_exact(np.ones((gh, gw), np.float32))
    if not full.size or full.max() <= 0:
        return None
    # full = s_y s_x^T (each axis' weights summed). A column probe gives s_y (A_x e_j)^T, a row probe
    # (A_y e_i) s_x^T: read both through one pixel (row, col) and divide by full[row, col] = s_y[row] s_x[col].
    row, col = np.unravel_index(int(np.argmax(full)), full.shape)
    a_x = np.empty((full.shape[1], gw), np.float32)
    for j in range(gw):
        probe = np.zeros((gh, gw), np.float32)
        probe[:, j] = 1.0
        a_x[:, j] = geometry.upsample_exact(probe)[row, :]
    a_y = np.empty((full.shape[0], gh), np.float32)
    for i in range(gh):
        probe = np.zeros((gh, gw), np.float32)
        probe[i, :] = 1.0
        a_y[:, i] = geometry.upsample_exact(probe)[:, col] / full[row, col]
    check = np.random.default_rng(0).random((gh, gw), dtype=np.float32)
    if np.abs(a_y @ check @ a_x.T - geometry.upsample_exact(check)).max() > 1e-3:
        return None
    a_y.flags.writeable = a_x.flags.writeable = False
    return a_y, a_x


def _size_value(size, key):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def geometry_for(bundle: ViTBundle, image_size: tuple[int, int], scale: float = 1.0) -> Geometry:
    """Reproduce the processor's resize + centre crop as numbers (matches its pixel_values exactly)."""
    proc = bundle.processor
    w, h = image_size
    if hasattr(proc, "resize_and_crop"):  # timm's transform states its own resize and crop
        resized, crop = proc.resize_and_crop(w, h)
        return Geometry((w, h), resized, crop, bundle.patch_size, scale)
    rw, rh = w, h
    if getattr(proc, "do_resize", True):
        size = proc.size
        short = _size_value(size, "shortest_edge")
        if _size_value(size, "height") and _size_value(size, "width"):
            rw, rh = _size_value(size, "width"), _size_value(size, "height")
        elif short:
            if w <= h:
                rw, rh = short, int(short * h / w)
            else:
                rw, rh = int(short * w / h), short
        else:
            raise ZoomViTError(f"Unsupported image processor size setting: {size}")
    if getattr(proc, "do_center_crop", False):
        ch, cw = _size_value(proc.crop_size, "height"), _size_value(proc.crop_size, "width")
        crop = ((rw - cw) // 2, (rh - ch) // 2, cw, ch)
    else:
        crop = (0, 0, rw, rh)
    return Geometry((w, h), (rw, rh), crop, bundle.patch_size, scale)


def encode(bundle: ViTBundle, loaded: LoadedImage) -> tuple[torch.Tensor, Geometry]:
    """pixel_values exactly as the model's own processor makes them, and the geometry that maps them back."""
    geometry = geometry_for(bundle, loaded.image.size, loaded.scale)
    if geometry.resized[0] * geometry.resized[1] > 64_000_000:
        raise ImageLoadError("Image aspect ratio is too extreme for this model's preprocessing.")
    pixel_values = bundle.processor(images=loaded.image, return_tensors="pt")["pixel_values"]
    if tuple(pixel_values.shape[-2:]) != (geometry.crop[3], geometry.crop[2]):
        raise ZoomViTError(
            f"Unexpected preprocessing: got {tuple(pixel_values.shape[-2:])}, expected "
            f"{(geometry.crop[3], geometry.crop[2])}."
        )
    return bundle.place(pixel_values), geometry


# ----------------------------------------------------------------------------------------------------------
# The analysis pass and its maps
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    index: int
    label: str
    prob: float

    def as_dict(self):
        return {"index": self.index, "label": self.label, "prob": round(self.prob, 6)}


HEAD_FUSIONS = ("mean", "max", "min")


def normalize_map(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes all zeros (there is nothing to point at)."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float32))
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


def floor_at_median(grid_map: np.ndarray) -> np.ndarray:
    """The map minus its median, clipped at 0: the background half of the patches carries no mass."""
    return np.clip(grid_map - np.median(grid_map), 0, None)


def top_mass_patches(grid_map: np.ndarray, mass: float = config.ZOOM_MASS) -> np.ndarray:
    """Boolean grid mask of the fewest patches holding `mass` of the map floored at its median (background
    patches carry no mass); all patches when nothing is left above the floor."""
    values = floor_at_median(grid_map)
    total = values.sum()
    if total <= 0:
        return np.ones(values.shape, dtype=bool)
    order = np.argsort(-values, axis=None)
    count = int(np.searchsorted(np.cumsum(values.ravel()[order]), mass * total) + 1)
    selected = np.zeros(values.size, dtype=bool)
    selected[order[:count]] = True
    return selected.reshape(values.shape)


def map_spread(grid_map: np.ndarray, mass: float = config.ZOOM_MASS) -> float:
    """Share of patches needed to hold `mass` of the median-floored map (uniform: about `mass`; one peak: 1/N)."""
    return float(top_mass_patches(grid_map, mass).mean())


def fuse_heads(attention: np.ndarray, head) -> np.ndarray:
    """attention: (..., heads, N, N). head: an index, or 'mean' / 'max' / 'min' across heads."""
    if isinstance(head, str) and head.lstrip("-").isdigit():
        head = int(head)
    if isinstance(head, (int, np.integer)):
        count = attention.shape[-3]
        if not -count <= int(head) < count:
            raise ZoomViTError(f"Head {head} is out of range (0..{count - 1}).")
        return attention[..., int(head), :, :]
    if head == "mean":
        return attention.mean(axis=-3)
    if head == "max":
        return attention.max(axis=-3)
    if head == "min":
        return attention.min(axis=-3)
    raise ZoomViTError(f"Unknown head '{head}': use an index or one of {HEAD_FUSIONS}.")


def rollout_matrix(fused: np.ndarray, discard_ratio: float) -> np.ndarray:
    """Abnar & Zuidema (2020) rollout over per-layer (L, N, N) fused attention.

    Each layer: drop the lowest `discard_ratio` share of weights, add the residual (identity), renormalise
    rows, and multiply into the running product. Rows of the result sum to 1.
    """
    n = fused.shape[-1]
    eye = np.eye(n, dtype=np.float64)
    result = eye.copy()
    for a in fused.astype(np.float64):
        if discard_ratio > 0:
            flat = a.ravel().copy()
            drop = int(flat.size * discard_ratio)
            if drop:
                flat[np.argpartition(flat, drop - 1)[:drop]] = 0.0
            a = flat.reshape(a.shape)
        a = (a + eye) / 2.0
        a = a / a.sum(axis=-1, keepdims=True)
        result = a @ result
    return result


def grad_rollout_matrix(attentions: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Chefer et al. (2021), generic rule: R <- R + mean_h[(grad * A)^+] @ R, from R = I, over all layers."""
    n = attentions.shape[-1]
    relevance = np.eye(n, dtype=np.float64)
    for a, g in zip(attentions.astype(np.float64), grads.astype(np.float64)):
        cam = np.clip(g * a, 0, None).mean(axis=0)
        relevance = relevance + cam @ relevance
    return relevance


@dataclass
class Analysis:
    """Everything one forward + one backward pass gives; every map below is computed from this cache."""

    bundle: ViTBundle
    loaded: LoadedImage
    geometry: Geometry
    pixel_values: torch.Tensor
    probs: np.ndarray  # (classes,)
    attentions: np.ndarray  # (layers, heads, N, N)
    target: int
    attention_grads: np.ndarray  # d logit[target] / d attention, same shape as attentions
    hidden_states: np.ndarray  # (layers + 1, N, hidden): the tokens entering each block, then the last output
    _graph: dict | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    # ---- predictions -------------------------------------------------------------------------------------
    @property
    def predicted(self) -> int:
        return int(self.probs.argmax())

    def top(self, k: int = config.TOP_K) -> list[Prediction]:
        return top_predictions(self.bundle, self.probs, k)

    @property
    def grid(self) -> tuple[int, int]:
        return self.geometry.grid

    @property
    def num_special(self) -> int:
        return self.bundle.num_special

    def _to_grid(self, token_values: np.ndarray) -> np.ndarray:
        gh, gw = self.grid
        return np.asarray(token_values[self.num_special :], dtype=np.float32).reshape(gh, gw)

    def _special_rows(self, matrix: np.ndarray) -> np.ndarray:
        """The decision's row: the rows of the tokens the head reads, weighted as it reads them
        (adapter.decision_weights). A DeiT without its teacher head carries a distillation token that the decision
        never reads; DINOv2 reads its class token and the mean of the patches."""
        weights = self.bundle.adapter.decision_weights(matrix.shape[0]).numpy().astype(matrix.dtype)
        return weights @ matrix

    # ---- raw attention -----------------------------------------------------------------------------------
    def _layer(self, layer: int) -> int:
        n = self.attentions.shape[0]
        if not -n <= int(layer) < n:
            raise ZoomViTError(f"Layer {layer} is out of range (0..{n - 1}).")
        return int(layer) % n

    def attention(self, layer: int = -1, head="mean") -> np.ndarray:
        """(N, N) attention of one layer, for one head or fused across heads; rows are queries."""
        return fuse_heads(self.attentions[self._layer(layer)], head)

    def cls_map(self, layer: int = -1, head="mean") -> np.ndarray:
        return normalize_map(self._to_grid(self._special_rows(self.attention(layer, head))))

    def patch_index(self, row: int, col: int) -> int:
        gh, gw = self.grid
        if not (0 <= row < gh and 0 <= col < gw):
            raise ZoomViTError(f"Patch ({row}, {col}) is outside the {gh}x{gw} grid.")
        return self.num_special + row * gw + col

    def attended_by_patch(self, row: int, col: int, layer: int = -1, head="mean") -> np.ndarray:
        """What patch (row, col) attends to: its query row, over patches."""
        return normalize_map(self._to_grid(self.attention(layer, head)[self.patch_index(row, col)]))

    def attending_patch(self, row: int, col: int, layer: int = -1, head="mean") -> np.ndarray:
        """What attends to patch (row, col): its key column, over patch queries."""
        return normalize_map(self._to_grid(self.attention(layer, head)[:, self.patch_index(row, col)]))

    # ---- relevance maps ----------------------------------------------------------------------------------
    def rollout(self, discard_ratio: float = config.ROLLOUT_DISCARD_RATIO, head=config.ROLLOUT_HEAD_FUSION):
        key = ("rollout", float(discard_ratio), str(head))
        if key not in self._cache:
            if not 0.0 <= discard_ratio < 1.0:
                raise ZoomViTError("discard_ratio must be in [0, 1).")
            matrix = rollout_matrix(fuse_heads(self.attentions, head), discard_ratio)
            self._cache[key] = normalize_map(self._to_grid(self._special_rows(matrix)))
        return self._cache[key]

    def grad_rollout(self, target: int | None = None) -> np.ndarray:
        if target is not None and int(target) != self.target:
            return self.for_target(target).grad_rollout()
        if "grad_rollout" not in self._cache:
            matrix = grad_rollout_matrix(self.attentions, self.attention_grads)
            self._cache["grad_rollout"] = normalize_map(self._to_grid(self._special_rows(matrix)))
        return self._cache["grad_rollout"]

    def intent(self, target: int | None = None, from_block: int = 0) -> np.ndarray:
        """The intent map: how much each token entering block `from_block` matters for the target's logit
        (formula in `intent_map`)."""
        if target is not None and int(target) != self.target:
            return self.for_target(target).intent(from_block=from_block)
        key = ("intent", int(from_block))
        if key not in self._cache:
            self._cache[key] = intent_map(self, from_block)
        return self._cache[key]

    def map(self, method: str, layer: int = -1, head="mean", discard_ratio=config.ROLLOUT_DISCARD_RATIO, target=None):
        """One entry point for every map kind, as named in the CLI and the app."""
        if method == "rollout":
            return self.rollout(discard_ratio, head if isinstance(head, str) else config.ROLLOUT_HEAD_FUSION)
        if method == "grad_rollout":
            return self.grad_rollout(target)
        if method == "intent":
            return self.intent(target)
        if method == "cls":
            return self.cls_map(layer, head)
        if method == "attention":
            # Attention received by each patch in this layer (column mean over queries).
            return normalize_map(self._to_grid(self.attention(layer, head).mean(axis=0)))
        raise ZoomViTError(f"Unknown method '{method}': use one of {MAP_METHODS}.")

    def upsample(self, grid_map: np.ndarray) -> np.ndarray:
        return self.geometry.upsample(grid_map)

    # ---- another target ----------------------------------------------------------------------------------
    def for_target(self, target: int) -> "Analysis":
        """The same analysis for another class: reuses the forward pass and re-runs only the backward."""
        target = int(target)
        if not 0 <= target < self.probs.shape[0]:
            raise ZoomViTError(f"Class index {target} is out of range (0..{self.probs.shape[0] - 1}).")
        if target == self.target:
            return self
        memo = self._cache.setdefault("targets", {})
        if target not in memo:
            if self._graph is None:  # graph was released: pay one more forward
                memo[target] = analyze(self.bundle, self.loaded, target=target, keep_graph=False)
            else:
                grads = _backward(self._graph, [target], keep_graph=True)[:, 0]
                memo[target] = Analysis(
                    self.bundle, self.loaded, self.geometry, self.pixel_values, self.probs, self.attentions,
                    target, grads, self.hidden_states, _graph=None,
                )
        return memo[target]

    def release_graph(self):
        """Free the autograd graph (other targets then cost a forward pass again)."""
        self._graph = None


MAP_METHODS = config.MAP_METHODS


def key_removal_effect(attentions: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """First-order change of the target logit when each token stops being a key, summed over layers and heads.

    Removing key j from row i zeroes A_ij and renormalises the row, so dy = -A_ij (g_ij - sum_k A_ik g_ik).
    Returns T (N,), T_j = sum_l,h,i A_lhij (g_lhij - sum_k A_lhik g_lhik): large = the logit needs token j.
    """
    a = attentions.astype(np.float64)
    g = grads.astype(np.float64)
    row_mean = (a * g).sum(axis=-1, keepdims=True)
    return (a * (g - row_mean)).sum(axis=(0, 1, 2))


def intent_map(analysis: Analysis, from_block: int = 0) -> np.ndarray:
    """intent = norm(norm(grad-weighted rollout) + norm(relu(key-removal effect))), both over blocks from_block..

    Attention and gradients flow through the rollout (how relevance propagates across layers); the key-removal
    effect adds, per token, how much the target logit loses without it. A sum rather than a product: a
    product zeroes most of the map, and ties among zeros made it less faithful on the deletion metric.
    """
    attn = analysis.attentions[from_block:]
    grads = analysis.attention_grads[from_block:]
    flow = analysis._to_grid(analysis._special_rows(grad_rollout_matrix(attn, grads)))
    needed = analysis._to_grid(np.clip(key_removal_effect(attn, grads), 0, None))
    return normalize_map(normalize_map(flow) + normalize_map(needed))


def _backward(graph: dict, targets: list[int], keep_graph: bool) -> np.ndarray:
    """Gradients of each image's target logit w.r.t. its attention maps, (layers, B, heads, N, N); no weight
    gradients: they are not needed. Images never interact, so one backward of the sum gives each its own."""
    logits = graph["logits"]
    chosen = logits[torch.arange(len(targets), device=logits.device), torch.as_tensor(targets, device=logits.device)]
    grads = torch.autograd.grad(chosen.sum(), list(graph["attentions"]), retain_graph=keep_graph)
    return to_numpy(torch.stack(grads))


def to_numpy(values: torch.Tensor) -> np.ndarray:
    """float32 on the CPU, whatever device and precision the model ran in: the maps are computed from these."""
    return values.detach().float().cpu().numpy()


def analyze(bundle: ViTBundle, image, target: int | None = None, keep_graph: bool = True) -> Analysis:
    """One forward pass with attentions and one backward pass from the target logit (default: predicted)."""
    loaded = image if isinstance(image, LoadedImage) else load_image(image)
    pixel_values, geometry = encode(bundle, loaded)
    return analyze_encoded(bundle, [loaded], [pixel_values], [geometry], [target], keep_graph)[0]


def analyze_many(bundle: ViTBundle, images) -> list[Analysis]:
    """`analyze` (predicted class, no graph kept) for several images in one batched forward and backward, as
    evaluation runs it: each result equals its own `analyze` to float precision. The images must preprocess to
    one size (every processor here makes the model's input size)."""
    loaded = [image if isinstance(image, LoadedImage) else load_image(image) for image in images]
    encoded = [encode(bundle, item) for item in loaded]
    return analyze_encoded(bundle, loaded, [pixels for pixels, _ in encoded], [geometry for _, geometry in encoded])


def analyze_encoded(bundle: ViTBundle, loaded: list, pixel_values: list, geometries: list, targets=None,
                    keep_graph: bool = False) -> list[Analysis]:
    """The batched analysis pass over images already `encode`d (each (1, C, H, W), all one size)."""
    shapes = {tuple(pixels.shape) for pixels in pixel_values}
    if len(shapes) > 1:
        raise ZoomViTError(f"A batched analysis needs images that preprocess to one size, got {sorted(shapes)}.")
    targets = [None] * len(loaded) if targets is None else targets
    pixel_values = torch.cat(pixel_values)
    adapter = bundle.adapter
    with torch.enable_grad():
        # The family's own blocks with eager attention: every probability stays in the graph for the backward.
        x = adapter.embed(pixel_values)
        hidden, attention = [x], []
        for i in range(adapter.num_layers):
            x, probs_i = adapter.block(i, x, full_attention=True)
            hidden.append(x)
            attention.append(probs_i)
        logits = adapter.head(x)
        probs = to_numpy(logits.detach().float().softmax(-1))  # float32 softmax: bfloat16 keeps 3 digits
        targets = [int(p.argmax()) if t is None else int(t) for p, t in zip(probs, targets)]
        for t in targets:
            if not 0 <= t < probs.shape[1]:
                raise ZoomViTError(f"Class index {t} is out of range (0..{probs.shape[1] - 1}).")
        graph = {"logits": logits, "attentions": attention}
        attention_grads = _backward(graph, targets, keep_graph)
    attentions = to_numpy(torch.stack(attention))
    hidden_states = to_numpy(torch.stack(hidden))
    return [
        Analysis(
            # Copies: one image's results should not hold on to its batch's arrays.
            bundle, loaded[i], geometries[i], pixel_values[i : i + 1].clone(), probs[i].copy(),
            attentions[:, i].copy(), targets[i], attention_grads[:, i].copy(), hidden_states[:, i].copy(),
            _graph=graph if keep_graph else None,
        )
        for i in range(len(loaded))
    ]


@torch.no_grad()
def predict(bundle: ViTBundle, image) -> np.ndarray:
    """Class probabilities from a plain forward pass (no attentions kept)."""
    loaded = image if isinstance(image, LoadedImage) else load_image(image)
    pixel_values, _ = encode(bundle, loaded)
    return predict_pixels(bundle, pixel_values)[0]


@torch.inference_mode()
def predict_pixels(bundle: ViTBundle, pixel_values: torch.Tensor) -> np.ndarray:
    """(B, classes) probabilities through the block engine: the HF model's logits to float precision, but with
    fused SDPA attention instead of the eager attention the analysis pass needs (about 25% faster)."""
    adapter = bundle.adapter
    x = adapter.embed(bundle.place(pixel_values))
    for i in range(adapter.num_layers):
        x, _ = adapter.block(i, x)
    return to_numpy(adapter.head(x).float().softmax(-1))


def top_predictions(bundle: ViTBundle, probs: np.ndarray, k: int = config.TOP_K) -> list[Prediction]:
    order = np.argsort(-probs)[:k]
    return [Prediction(int(i), bundle.label(i), float(probs[i])) for i in order]
