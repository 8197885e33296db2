"""Defaults for ZoomViT Explorer. Every knob the app, the CLI and the library share lives here."""

import os

# A hub id or a local folder in Hugging Face layout; ZOOMVIT_MODEL overrides it, --model overrides both.
DEFAULT_MODEL = "google/vit-base-patch16-224"
MODEL_ENV_VAR = "ZOOMVIT_MODEL"

TOP_K = 5

# The Explore tab's first view: the map the eval measures most faithful on DeiT-Tiny, by the figure its "best map"
# goal ranks by. README Results, faithfulness tables, deletion AUC x 100 (lower is better): grad_rollout 11.42,
# intent 11.50, rollout 18.59 on imagenet-sample; 5.06, 5.17, 9.84 on zoom-bench. (Intent leads on insertion AUC,
# 47.84 against 46.40 on imagenet-sample.)
DEFAULT_VIEW = "grad_rollout"
# A patch's output token (after the last block) is flagged as a high-norm artifact token (Darcet et al. 2024, "Vision
# Transformers Need Registers") above this multiple of the median patch-token norm. DeiT-Tiny's largest ratio was 2.8
# (median 2.2) on 63 imagenet-sample photos, with no gap in the distribution: no artifacts. The paper's artifacts
# form a separate mode, far above the other tokens' norms.
ARTIFACT_NORM_RATIO = 4.0

# Attention rollout as in the seed study: mean over heads, residual added, lowest 90% of weights dropped.
ROLLOUT_HEAD_FUSION = "mean"
HEAD_FUSIONS = ("mean", "max", "min")  # a map over all heads: their mean, max or min
ROLLOUT_DISCARD_RATIO = 0.9
MAX_DISCARD_RATIO = 0.95  # the most the app's slider and the CLI accept (at 1 nothing would be left)

# Token pruning.
PRUNE_AFTER_BLOCK = 6
PRUNE_KEEP = 0.5
PRUNE_MODE = "analysis"
PRUNE_FUSION = "merge"  # efficiency mode: what becomes of the tokens not kept (PRUNE_FUSIONS)

# Input guards: images are downscaled so their longest side is at most this before anything else;
# files above MAX_FILE_PIXELS are refused from the header alone.
MAX_IMAGE_SIDE = 2048
MAX_FILE_PIXELS = 12000 * 12000
# Memory is bounded by what decoding costs, not by file size: a 280 KB PNG can declare 12000x12000 16-bit pixels.
# Estimated from the header (pixels x bytes per pixel in Pillow's memory x the format's decoder overhead), files
# above this are refused before decoding. 400 MB holds a 10000x10000 RGB PNG (Pillow keeps RGB at 4 bytes a
# pixel) or the largest 16-bit greyscale file the pixel limit allows (288 MB); shrinking to RGB then adds only
# small strips, so one upload stays under about 0.5 GB above the server's baseline, and four at once (~2 GB)
# still fit the 3 GB goal on a 2-core/24 GB machine. JPEGs are costed at their reduced (draft) decode size.
MAX_DECODE_BYTES = 400_000_000
# Preprocessors that resize the shortest edge would blow a 1x4000 strip up to an enormous image.
MAX_ASPECT_RATIO = 50.0
# An image whose shorter side is below this share of the model's input side is enlarged so much before the model
# sees it (a 16x12 icon: 14x) that its predictions and maps say little: the CLI and the app say so.
SMALL_IMAGE_SHARE = 0.25

# Zoom box from an importance map.
ZOOM_MASS = 0.6  # the box must hold this share of the map's mass (after the background floor)
ZOOM_PADDING = 0.15  # padding added on each side, as a fraction of the box side
ZOOM_MIN_SIDE = 0.2  # minimum box side as a fraction of the shorter image side (and never under one patch's pixels)
ZOOM_MAX_AREA = 0.5  # the adaptive policy only zooms when the box covers at most this share of the image
# A map is diffuse when 60% of its (median-floored) mass needs more than this share of the patches.
DIFFUSE_SPREAD = 0.3
# ... or when the largest connected region holds less than this share of that mass. On DeiT-Tiny intent maps the
# spread never passed 0.16 (imagenet-sample), while a focus below 0.3 (the lowest quarter) went with lower
# top-1 (76% against 86% for the middle half, 167 images): scattered importance is the diffuse case seen in practice.
DIFFUSE_FOCUS = 0.3
# After an adaptive zoom the prediction mixes both looks; 0.7 on the whole image keeps ImageNet-sample top-1
# from dropping (measured on DeiT-Tiny), while an unsure whole image still defers to a confident crop.
ZOOM_WHOLE_WEIGHT = 0.7
# The confident zoom (benchmarks/zoom_study.py, docs/zoom.md): tight boxes (no padding) from these maps and masses,
# the most confident crop, used only when its top probability beats the whole image's by ZOOM_MARGIN. Chosen on
# the dev sets (zoom-bench and imagenet-sample) with DeiT-Tiny; "keys" is the key-similarity map (LOST).
ZOOM_CANDIDATES = (("focus", 0.6), ("keys", 0.4), ("keys", 0.6))
ZOOM_MARGIN = 0.1
ZOOM_KEY_SEEDS = 10  # the key-similarity map's seed set: the lowest-degree patches that correlate with the seed
# The diagnosis flags a prediction that is itself a guess: top-1 below GUESS_PROB (DeiT-Tiny's top-1 was at least
# 21% on 60 ImageNet-sample photos, 1-4% on noise), or below GUESS_OVER_CHANCE x chance for models with few classes
# (a 10-class model at 25% is still close to chance).
GUESS_PROB = 0.1
GUESS_OVER_CHANCE = 3.0


def resolve_model_name(explicit=None):
    """--model beats ZOOMVIT_MODEL beats the default hub id."""
    return explicit or os.environ.get(MODEL_ENV_VAR) or DEFAULT_MODEL


# Where the model runs and in which precision; checked by devices.resolve_device / resolve_dtype.
# auto: cuda if available, else mps, else cpu. A GPU is named as torch names it (cuda:1).
DEVICE_ENV_VAR = "ZOOMVIT_DEVICE"
DTYPE_ENV_VAR = "ZOOMVIT_DTYPE"
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("float32", "bfloat16", "float16")
DEVICE_HELP = f"{'|'.join(DEVICES)} or cuda:N; auto: cuda, else mps, else cpu"  # the CLI's and the app's --help
DTYPE_HELP = f"{'|'.join(DTYPES)}; float16 on a GPU only"


def resolve_device_name(explicit=None) -> str:
    """--device beats ZOOMVIT_DEVICE beats auto."""
    return explicit or os.environ.get(DEVICE_ENV_VAR) or "auto"


def resolve_dtype_name(explicit=None) -> str:
    """--dtype beats ZOOMVIT_DTYPE beats float32."""
    return explicit or os.environ.get(DTYPE_ENV_VAR) or "float32"


# The web app serves several models (chosen per browser session) and keeps at most this many in memory, the least
# recently used leaving first: --max-models beats ZOOMVIT_MAX_MODELS beats DEFAULT_MAX_MODELS.
MAX_MODELS_ENV_VAR = "ZOOMVIT_MAX_MODELS"
DEFAULT_MAX_MODELS = 2


def resolve_max_models(explicit=None) -> tuple[object, str]:
    """(value, where it came from, as a user names it): checked by checks.check_max_models."""
    if explicit is not None:
        return explicit, "--max-models"
    if os.environ.get(MAX_MODELS_ENV_VAR):
        return os.environ[MAX_MODELS_ENV_VAR], f"${MAX_MODELS_ENV_VAR}"
    return DEFAULT_MAX_MODELS, "--max-models"


# The choices of the library's options, here so that the CLI lists them in --help without importing the library
# (importing torch would make --help slow); the library's MAP_METHODS, POLICIES, MODES, ... are these.
MAP_METHODS = ("rollout", "grad_rollout", "intent", "cls", "attention")
# The settings each map reads (Analysis.map): the CLI notes an option given to a map that does not read it, the
# app's exports record only these, and a map that reads no target is class-agnostic (the forward attentions alone).
MAP_READS = {
    "rollout": ("head", "discard_ratio"),
    "grad_rollout": ("target",),
    "intent": ("target",),
    "cls": ("block", "head"),
    "attention": ("block", "head"),
}
ZOOM_POLICIES = ("confident", "adaptive", "always")
# The zoom without --zoom-policy / --policy (and the app's first choice); "adaptive" is the earlier default.
ZOOM_POLICY = "confident"
ZOOM_POLICY_HELP = (  # zoom --policy and eval --zoom-policy
    "confident: the most confident of tight crops (the focus and key-similarity maps), used when it beats the whole "
    "image's top probability by a margin; adaptive (the earlier rule): zoom only when the attention sits in a small, "
    "concentrated box, then combine whole image and crop; always: classify the crop alone"
)
PRUNE_MODES = ("analysis", "efficiency")
PRUNE_FUSIONS = ("drop", "fuse", "merge")
EVAL_TASKS = ("prune", "zoom", "faithfulness", "intent", "sanity")
# Without --tasks: all but the sanity checks, which analyse every image once per randomisation level (14 passes
# for a 12-block model) and answer a question about the maps, not about this data.
EVAL_DEFAULT_TASKS = ("prune", "zoom", "faithfulness", "intent")
EVAL_KEEPS = (0.9, 0.7, 0.5, 0.3, 0.1)
# `zoomvit eval --batch`: images analysed together in pass 1 (one batched analysis pass with its backward; their
# perturbation forwards run together, in batches of faithfulness.BATCH).
EVAL_BATCH = 8
