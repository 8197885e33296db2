"""Model loading, one cached analysis pass (attentions + their gradients), and every importance map.

Data flows one way: image -> `load_image` -> `analyze` (one forward, one backward) -> `Analysis` maps.
Zoom, pruning, the app and the CLI all read from the same `Analysis`.
"""

from __future__ import annotations

import functools
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

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


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white so it doesn't turn black."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit and float: stretch the actual range to 8 bits (a plain convert("L") clips to 255).
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        img = Image.fromarray(np.nan_to_num(arr).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_image(source, max_side: int = config.MAX_IMAGE_SIDE) -> LoadedImage:
    """Open a path, bytes, a PIL image or an HxW(x3/4) array as RGB, with a clear error if it can't.

    Handles EXIF rotation, the first frame of animations, grayscale/RGBA/CMYK/16-bit/palette modes, and
    downscales huge images (JPEG decodes at reduced size via draft mode, so memory stays bounded).
    """
    if source is None:
        raise ImageLoadError("No image given.")
    opened = None
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
                img = opened = Image.open(stream)
            if img.width * img.height > config.MAX_FILE_PIXELS:
                raise ImageLoadError(
                    f"Image is too large ({img.width}x{img.height} pixels); "
                    f"the limit is {config.MAX_FILE_PIXELS:,} pixels."
                )
            img.seek(0)  # first frame of an animated GIF/WebP/TIFF
            original_size = img.size
            if max(original_size) / max(1, min(original_size)) > config.MAX_ASPECT_RATIO:
                raise ImageLoadError(
                    f"Image is {original_size[0]}x{original_size[1]}: aspect ratio above "
                    f"{config.MAX_ASPECT_RATIO:g}:1 is not supported."
                )
            if img.format == "JPEG" and max(img.size) > 2 * max_side:
                img.draft("RGB", (max_side, max_side))
            img.load()
            # EXIF orientation swaps width/height for 90-degree rotations; the "original" is what a viewer shows.
            transposed = ImageOps.exif_transpose(img)
            if transposed is not None and transposed is not img:
                if transposed.size != img.size:
                    original_size = original_size[::-1]
                img = transposed
            img = _to_rgb(img)
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
            opened.close()
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
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

    @property
    def backbone(self):
        return self.model.base_model

    @property
    def layers(self):
        return self.backbone.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return self.model.config.num_attention_heads

    def label(self, index: int) -> str:
        return str(self.id2label.get(int(index), f"class {int(index)}"))

    def find_label(self, text: str) -> int:
        """A class index from an index, an exact label, or a unique case-insensitive substring of a label."""
        text = str(text).strip()
        if text.lstrip("-").isdigit():
            index = int(text)
            if not 0 <= index < len(self.id2label):
                raise ZoomViTError(f"Class index {index} is out of range (0..{len(self.id2label) - 1}).")
            return index
        lowered = text.lower()
        exact = [i for i, name in self.id2label.items() if str(name).lower() == lowered]
        if exact:
            return int(exact[0])
        names = [(i, str(n).lower()) for i, n in self.id2label.items()]
        # Prefer a match on a whole comma-separated synonym ("tench" in "tench, Tinca tinca").
        whole = [i for i, n in names if lowered in [s.strip() for s in n.split(",")]]
        if len(whole) == 1:
            return int(whole[0])
        partial = [i for i, n in names if lowered in n]
        if len(partial) == 1:
            return int(partial[0])
        if not partial:
            raise ZoomViTError(f"No class label matches '{text}'.")
        examples = ", ".join(self.label(i) for i in partial[:5])
        raise ZoomViTError(f"'{text}' matches {len(partial)} labels (e.g. {examples}); be more specific.")


def load_model(name: str | None = None) -> ViTBundle:
    """Load a hub id or a local folder with eager attention (the default SDPA path returns no attentions)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    name = config.resolve_model_name(name)
    local = Path(name).expanduser()
    if local.exists():
        name = str(local)
    elif name.startswith((".", "/", "~")):
        raise ModelLoadError(f"Model folder not found: {name}")
    try:
        processor = AutoImageProcessor.from_pretrained(name)
        model = AutoModelForImageClassification.from_pretrained(name, attn_implementation="eager")
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")
        why = "offline, and it is not in the local cache" if offline else str(exc).strip().splitlines()[0][:200]
        hint = (
            f"Could not load model '{name}' ({why}). Pass a local folder in Hugging Face layout with "
            f"--model PATH or {config.MODEL_ENV_VAR}=PATH."
        )
        raise ModelLoadError(hint) from exc
    model.eval()
    cfg = model.config
    if not hasattr(model.base_model, "layers") or not hasattr(model.base_model, "embeddings"):
        raise ModelLoadError(f"'{name}' is not a ViT-style image classifier (model type {cfg.model_type}).")
    patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
    size = cfg.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    num_special = 1 + int(getattr(model.base_model.embeddings, "distillation_token", None) is not None)
    return ViTBundle(model, processor, name, patch, size, num_special, dict(cfg.id2label))


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
    return pixel_values, geometry


# ----------------------------------------------------------------------------------------------------------
# A block-level forward engine (used for pruning, where later blocks run on fewer tokens)
# ----------------------------------------------------------------------------------------------------------


def embed(bundle: ViTBundle, pixel_values: torch.Tensor) -> torch.Tensor:
    interpolate = tuple(pixel_values.shape[-2:]) != tuple(bundle.input_size)
    return bundle.backbone.embeddings(pixel_values, interpolate_pos_encoding=interpolate)


def run_block(layer, x: torch.Tensor, attn_bias: torch.Tensor | None = None, attention_rows: int = 0):
    """One pre-norm transformer block, numerically the same as the HF layer, on any number of tokens.

    attn_bias (broadcast to B x heads x N x N) is added to the attention logits: log(token size) for merged
    tokens makes a merged token count as the tokens it stands for (proportional attention).
    attention_rows > 0 also returns the attention probabilities of the first `attention_rows` queries (the
    special tokens), computed on their own so the block itself keeps the fused SDPA kernel.
    Returns (x, probabilities (B, heads, attention_rows, N) or None).
    """
    att = layer.attention
    h = layer.layernorm_before(x)
    b, n, _ = h.shape
    shape = (b, n, -1, att.head_dim)
    q = att.q_proj(h).view(shape).transpose(1, 2)
    k = att.k_proj(h).view(shape).transpose(1, 2)
    v = att.v_proj(h).view(shape).transpose(1, 2)
    probs = None
    if attention_rows:
        logits = torch.matmul(q[:, :, :attention_rows], k.transpose(-2, -1)) * att.scaling
        if attn_bias is not None:
            logits = logits + attn_bias
        probs = logits.softmax(dim=-1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=att.scaling)
    out = out.transpose(1, 2).reshape(b, n, -1)
    x = x + att.o_proj(out)
    x = x + layer.mlp(layer.layernorm_after(x))
    return x, probs


def classify_tokens(bundle: ViTBundle, x: torch.Tensor) -> torch.Tensor:
    """Logits from the last block's tokens (special tokens first), for every head layout we support."""
    seq = bundle.backbone.layernorm(x)
    model = bundle.model
    if hasattr(model, "distillation_classifier"):  # distilled DeiT: average the CLS and distillation heads
        return (model.cls_classifier(seq[:, 0]) + model.distillation_classifier(seq[:, 1])) / 2
    return model.classifier(seq[:, 0])


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
        """The decision reads the special token(s): average their rows."""
        return matrix[: self.num_special].mean(axis=0)

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
                grads = _backward(self._graph, target, keep_graph=True)
                memo[target] = Analysis(
                    self.bundle, self.loaded, self.geometry, self.pixel_values, self.probs, self.attentions,
                    target, grads, self.hidden_states, _graph=None,
                )
        return memo[target]

    def release_graph(self):
        """Free the autograd graph (other targets then cost a forward pass again)."""
        self._graph = None


MAP_METHODS = ("rollout", "grad_rollout", "intent", "cls", "attention")


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


def _backward(graph: dict, target: int, keep_graph: bool) -> np.ndarray:
    """Gradients of one logit w.r.t. every attention map (no weight gradients: they are not needed)."""
    grads = torch.autograd.grad(graph["logits"][0, target], list(graph["attentions"]), retain_graph=keep_graph)
    return torch.stack(grads)[:, 0].numpy()


def analyze(bundle: ViTBundle, image, target: int | None = None, keep_graph: bool = True) -> Analysis:
    """One forward pass with attentions and one backward pass from the target logit (default: predicted)."""
    loaded = image if isinstance(image, LoadedImage) else load_image(image)
    pixel_values, geometry = encode(bundle, loaded)
    interpolate = tuple(pixel_values.shape[-2:]) != tuple(bundle.input_size)
    with torch.enable_grad():
        out = bundle.model(
            pixel_values=pixel_values,
            output_attentions=True,
            output_hidden_states=True,
            interpolate_pos_encoding=interpolate,
        )
        if not out.attentions:
            raise ModelLoadError(
                "The model returned no attention maps; it must be loaded with attn_implementation='eager'."
            )
        probs = out.logits[0].detach().softmax(-1).numpy()
        target = int(probs.argmax()) if target is None else int(target)
        if not 0 <= target < probs.shape[0]:
            raise ZoomViTError(f"Class index {target} is out of range (0..{probs.shape[0] - 1}).")
        graph = {"logits": out.logits, "attentions": out.attentions}
        attention_grads = _backward(graph, target, keep_graph)
    attentions = torch.stack(out.attentions)[:, 0].detach().numpy()
    hidden_states = torch.stack(out.hidden_states)[:, 0].detach().numpy()
    return Analysis(
        bundle, loaded, geometry, pixel_values, probs, attentions, target, attention_grads, hidden_states,
        _graph=graph if keep_graph else None,
    )


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
    x = embed(bundle, pixel_values)
    for layer in bundle.layers:
        x, _ = run_block(layer, x)
    return classify_tokens(bundle, x).softmax(-1).numpy()


def top_predictions(bundle: ViTBundle, probs: np.ndarray, k: int = config.TOP_K) -> list[Prediction]:
    order = np.argsort(-probs)[:k]
    return [Prediction(int(i), bundle.label(i), float(probs[i])) for i in order]
