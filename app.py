"""ZoomViT Explorer, the web app: see where a Vision Transformer looks, click a patch, zoom in, prune tokens.

    python app.py [--model HUB_ID_OR_FOLDER] [--host 127.0.0.1] [--port 7860]

UI only: every number comes from the library (vit_analyzer, zoom, pruning, intent, visualization).

Speed: the model runs on an upload, a target-class change, zoom and prune, one event at a time (a queue with one
worker for them: one model, bounded memory). Each session keeps its `Analysis` in a gr.State (Gradio stores the
object as is, without copying it); every other control re-renders from it, on a copy of the image at most
DISPLAY_SIDE pixels wide (benchmarks/bench_views.py measures this path).

Conventions, the same in the app, the API, the CLI and the reports: blocks are numbered 1..L; `keep` is the
share of patch tokens kept, a fraction in (0, 1].

API: /explain, /inspect_patch, /zoom and /prune take the image first and plain values after it, each with a
default. A call with an image the session has already analysed reuses that analysis. Only files that came
through this server's upload route are opened.

Errors: an API call gets the message as its error. In the browser a failure is a warning toast and every view
keeps its last good state (a raised error would paint each output with a red badge); a new file that cannot
be analysed clears the previous image's results and says why.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
# numpy's OpenBLAS on one thread: see `one_blas_thread` (this covers `python app.py`, where numpy is not
# imported yet; main() also switches an already loaded OpenBLAS, as under `zoomvit serve`).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import csv  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import weakref  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from gradio.utils import get_upload_folder  # noqa: E402
from PIL import Image  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

import config  # noqa: E402
import intent  # noqa: E402
import pruning  # noqa: E402
import visualization  # noqa: E402
import models  # noqa: E402
import zoom as zoom_lib  # noqa: E402
from checks import check_after_block, layer_index  # noqa: E402
from errors import ZoomViTError  # noqa: E402
from geometry import Geometry, geometry_for  # noqa: E402
from images import load_image, release_memory  # noqa: E402
from vit_analyzer import Analysis, Prediction, analyze, top_predictions  # noqa: E402

log = logging.getLogger("zoomvit.app")

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "assets"

DISPLAY_SIDE = 768  # images are drawn at most this many pixels on their longest side
MIN_DISPLAY_SIDE = 256  # ... and tiny images are blown up to this on their shortest side (where the longest allows)
CROP_SIDE = 384  # the zoom crop, shown beside the image
HEAD_TILE = 128  # one tile of the all-heads grid
MAX_UPLOAD = "25mb"  # Gradio refuses larger uploads; images.load_image also bounds the decoded pixels
MAX_SESSIONS = 32  # sessions whose state the server keeps (oldest dropped first): ~15-70 MB each
SESSION_TTL_S = 2 * 3600  # a session's analysis is dropped after this long without an update
GRAPHS_KEPT = 4  # analyses that keep their autograd graph (a target change then costs only a backward)
TIMING_REPEATS = 7  # prune: runs timed before and after (interleaved); the median and the range are shown
KEEP_MIN = 0.1  # the smallest keep the app offers (and the API accepts)
# Gradio's temp folder holds every upload and every output image (~150 KB a call). It is kept under this size
# and age (oldest files first), swept after each upload and every SWEEP_PERIOD_S.
TEMP_MAX_BYTES = 512 * 1024 * 1024
TEMP_MAX_AGE_S = 3600
SWEEP_PERIOD_S = 60
MODEL_QUEUE = "model"  # the concurrency id of every event that may run the model (one at a time)

VIEWS = [
    ("Rollout", "rollout"),
    ("Gradient-weighted", "grad_rollout"),
    ("Intent", "intent"),
    ("CLS attention", "cls"),
    ("Attention", "attention"),
]
VIEW_NAMES = dict((value, label) for label, value in VIEWS)
TARGET_VIEWS = ("grad_rollout", "intent")  # the only views that depend on the target class
COLORMAPS = ["jet", "turbo", "viridis", "inferno", "magma", "plasma", "hot", "gray"]
DIRECTIONS = [("what it attends to", "attends_to"), ("what attends to it", "attended_by")]
POLICIES = [("adaptive: zoom only if it helps", "adaptive"), ("always zoom", "always")]
MODES = [("analysis (intent ranking, look-ahead)", "analysis"), ("efficiency (no look-ahead, merge)", "efficiency")]
NOT_UPLOADED = "This file did not come through this app's upload; upload it again."

CSS = """
#overlay img, #overlay canvas { cursor: crosshair; }
.zv-legend { display: flex; align-items: center; gap: .5em; font-size: .85em; margin: 0 .25em; }
.zv-legend .bar { flex: 1; height: 10px; border-radius: 3px; }
"""

ABOUT = """
**What each view shows, and when to trust it**

- **Rollout**: attention multiplied through all blocks (Abnar & Zuidema 2020): which patches feed the class token
  through the network. Class-agnostic: it shows where the model *looks*, not why it picks a class. Often lights up
  a few background patches that ViTs use as scratch space.
- **Gradient-weighted**: rollout with each attention weighted by its gradient for the *target class* (Chefer et
  al. 2021). Class-specific: the patches whose attention raises that class. The most faithful map on deletion tests.
- **Intent**: gradient-weighted rollout plus how much removing each patch's key would change the target class,
  over all blocks. What the decision depends on; about as faithful as gradient-weighted, a little sharper.
- **CLS attention**: what the class token reads in one block (one head, or mean/max/min over heads).
- **Attention**: how much attention each patch receives in one block, from all tokens.
- **Clicking a patch**: what that patch attends to (its attention row) or what attends to it (its column), in the
  chosen block and head.

**Intent diagnosis** (about the predicted class): *good*: importance is concentrated and the region alone is
still classified the same; *inverted*: the region the model relies on, cropped out, is not classified as its
answer, so the decision leans on context or background; *diffuse*: importance is scattered over separate places.
"Inverted" can appear on a right answer: a model can be right for contextual reasons (a tench recognised by the
angler holding it).

**The dark band**: the model sees only its centre crop (DeiT: resize to 256, crop 224). Pixels outside the
crop never reach the model, so every map is zero there.

**Numbering**: blocks are numbered 1 to {layers}; *prune after block 6* means blocks 7 to {layers} see only the
kept tokens. *Keep* is the share of patch tokens kept (0.1 to 1.0); the class token is always kept.

**Zoom**: a box around where the model looks, the crop classified again. Adaptive zoom only uses the crop when
the box is small, and then mixes both predictions (70% whole image, 30% crop).

**Pruning**: *analysis* mode ranks tokens by intent (it looks ahead at the whole model: an explanation tool, not a
speed-up); *efficiency* mode ranks them without look-ahead and merges the dropped ones into the kept ones.
MACs count the multiply-adds; the measured time is the median of several runs on this server's CPU, which other
users share, so differences within the shown range are noise.
"""


# ----------------------------------------------------------------------------------------------------------
# Uploads and the temp folder
# ----------------------------------------------------------------------------------------------------------


def uploaded_file(path, also=()) -> str:
    """`path` if it lies in the folder this server's upload route writes to (or in one of `also`); otherwise
    refused. No URL passes.

    Nothing is looked up before the check, so the answer says nothing about whether a path exists. Shipped
    examples pass: Gradio copies them into the same folder when the app is built.
    """
    if "://" in str(path):
        raise gr.Error(NOT_UPLOADED)
    real = os.path.realpath(str(path))
    for root in (get_upload_folder(), *also):
        folder = os.path.realpath(root)
        if real != folder and os.path.commonpath([folder, real]) == folder:
            return real
    raise gr.Error(NOT_UPLOADED)


class TempJanitor:
    """Keeps Gradio's temp folder under a size and an age, oldest files first.

    Gradio's own sweep runs on a timer and only knows the files of its events: bare posts to the upload route
    stay until it runs. Files Gradio marks to keep (the examples) are never removed.
    """

    def __init__(self, max_bytes: int = TEMP_MAX_BYTES, max_age_s: float = TEMP_MAX_AGE_S):
        self.max_bytes, self.max_age_s = max_bytes, max_age_s
        self.protectors = []  # callables giving paths to keep
        self._lock = threading.Lock()  # one sweep at a time
        self._pending_lock = threading.Lock()
        self._pending = self._again = False
        self._thread = None

    @property
    def folder(self) -> Path:
        return Path(get_upload_folder())

    def sweep(self) -> int:
        """Delete what is over the age, then the oldest until under the size; returns the bytes left."""
        with self._lock:
            keep = set()
            for protector in self.protectors:
                keep.update(os.path.realpath(p) for p in protector())
            files, total = [], 0
            for root, _, names in os.walk(self.folder):
                for name in names:
                    path = os.path.join(root, name)
                    try:
                        stat = os.lstat(path)
                    except OSError:
                        continue
                    total += stat.st_size  # kept files count towards the size too
                    if os.path.realpath(path) not in keep:
                        files.append((stat.st_mtime, stat.st_size, path))
            files.sort()
            cutoff = time.time() - self.max_age_s
            for mtime, size, path in files:
                if mtime >= cutoff and total <= self.max_bytes:
                    break
                try:
                    os.remove(path)
                    total -= size
                except OSError:
                    pass
            self._remove_empty_folders()
            return total

    def _remove_empty_folders(self):
        for root, dirs, files in os.walk(self.folder, topdown=False):
            if root != str(self.folder) and not dirs and not files:
                try:
                    os.rmdir(root)
                except OSError:
                    pass

    def sweep_soon(self):
        """After an upload: sweep in the background. A flood of uploads runs one sweep at a time, and one more
        after it for what arrived meanwhile."""
        with self._pending_lock:
            if self._pending:
                self._again = True
                return
            self._pending, self._again = True, False
        threading.Thread(target=self._sweep_until_settled, daemon=True).start()

    def _sweep_until_settled(self):
        while True:
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - a sweep must never take the server down
                log.exception("temp folder sweep failed")
            with self._pending_lock:
                if not self._again:
                    self._pending = False
                    return
                self._again = False

    def start(self, period_s: float = SWEEP_PERIOD_S):
        if self._thread is None:
            def loop():
                while True:
                    time.sleep(period_s)
                    try:
                        self.sweep()
                    except Exception:  # noqa: BLE001 - a sweep must never take the server down
                        log.exception("temp folder sweep failed")

            self._thread = threading.Thread(target=loop, daemon=True, name="zoomvit-temp-sweep")
            self._thread.start()


JANITOR = TempJanitor()  # one per process: the upload folder is per process too


class SweepAfterUploads:
    """ASGI middleware: each request to the upload route schedules a sweep of the temp folder."""

    def __init__(self, app, janitor: TempJanitor = JANITOR):
        self.app, self.janitor = app, janitor

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)
        if scope.get("type") == "http" and scope.get("path", "").endswith("/upload"):
            self.janitor.sweep_soon()


# ----------------------------------------------------------------------------------------------------------
# Session state
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Shown:
    """What the Explore overlay shows now: enough to export it at full resolution."""

    grid_map: np.ndarray
    caption: str
    colormap: str
    alpha: float
    settings: dict
    patch: tuple | None = None


@dataclass(eq=False)
class Session:
    """One user's cached analysis and what the UI drew from it. Lives in a gr.State, never in a global."""

    key: str  # content hash of the image file
    path: str  # the uploaded file it came from (a later event with the same path skips hashing)
    analysis: Analysis
    display: Image.Image  # the working image, at most DISPLAY_SIDE pixels
    geometry: Geometry  # the model's geometry, for `display`'s pixels
    diagnosis: intent.Diagnosis
    label_index: dict = field(default_factory=dict)  # top-k label text (as shown) -> class index
    patch: tuple | None = None  # the clicked patch (row, col), if any
    target_text: str = ""  # the last target class that worked (the dropdown goes back to it after an error)
    shown: Shown | None = None
    zoom_result: zoom_lib.ZoomResult | None = None
    prune_result: pruning.PruneResult | None = None  # the one on screen
    grid_key: tuple | None = None  # the settings the all-heads grid below was drawn with
    grid_image: Image.Image | None = None

    def original_to_display(self, x: float, y: float) -> tuple[float, float]:
        ow, oh = self.analysis.loaded.original_size
        return x * self.display.width / ow, y * self.display.height / oh

    def display_to_original(self, x: float, y: float) -> tuple[float, float]:
        ow, oh = self.analysis.loaded.original_size
        return x * ow / self.display.width, y * oh / self.display.height


class GraphBudget:
    """Keeps the autograd graph only for the newest few analyses (memory); older ones release theirs.

    Holds weak references only: it never keeps a session's analysis alive.
    """

    def __init__(self, size: int):
        self.size = size
        self._refs = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, analysis):
        with self._lock:
            self._refs[id(analysis)] = weakref.ref(analysis)
            while len(self._refs) > self.size:
                _, ref = self._refs.popitem(last=False)
                old = ref()
                if old is not None:
                    old.release_graph()


def _release(session):
    """gr.State delete callback: free the graph as soon as Gradio drops the session."""
    if isinstance(session, Session):
        session.analysis.release_graph()


def one_blas_thread() -> bool:
    """Run numpy's OpenBLAS on one thread in this process; True if a loaded OpenBLAS was switched.

    The maps are many small matrix products (197 x 197 for ViT-B). OpenBLAS splits each across all cores,
    and next to model runs and other sessions the threads mostly wait for each other: on 2 busy cores a
    cached view took ~25 ms and a rollout ~200 ms that way, 4 ms and 20 ms on one thread
    (benchmarks/bench_views.py). Uses threadpoolctl when installed, else the same OpenBLAS call it makes.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass
    else:
        return bool(threadpool_limits(1, user_api="blas"))
    import ctypes

    try:
        with open("/proc/self/maps") as maps:  # Linux: the shared libraries loaded in this process
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}
    except OSError:
        return False
    switched = False
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(1)
                switched = True
                break
    return switched


def legend_html(cmap: str) -> str:
    stops = ", ".join(visualization.colormap_stops(cmap))
    return (f'<div class="zv-legend"><span>less important</span>'
            f'<span class="bar" style="background: linear-gradient(to right, {stops})"></span>'
            f'<span>more important</span></div>')


def _file_key(path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def plain_text(markdown: str) -> str:
    """A caption without its Markdown emphasis (for the exported picture)."""
    return re.sub(r"\*{1,2}([^*]+)\*{1,2}", r"\1", markdown)


# Component tweaks are made on the instances: subclassing a Gradio component makes Gradio write a .pyi stub
# beside this file at import time.


def hand_over_the_file(image: gr.Image) -> gr.Image:
    """Make an upload component open only files that came through this server's upload, and pass their path to
    our own loader.

    Stock gr.Image opens any server path sent as {"path": ...} without Gradio's file marker, and with the marker
    Gradio copies any server path (or fetches any URL) into its cache before the component sees it: both doors
    are closed here. The stock preprocess also opens the file with Pillow first (a broken file fails inside
    Gradio with a bare "Error"); `images.load_image` gives a message that says what is wrong.
    """
    stock_preprocess = image.preprocess
    stock_move, stock_async_move = image.move_resource_to_block_cache, image.async_move_resource_to_block_cache

    def preprocess(payload):
        if payload is not None and getattr(payload, "path", None):
            return uploaded_file(payload.path)
        return stock_preprocess(payload)  # nothing, or a data: URL

    def move(path):  # inputs before they reach preprocess; the examples when the app is built
        if path is not None:
            uploaded_file(path, also=[EXAMPLES_DIR])
        return stock_move(path)

    async def async_move(path):
        if path is not None:
            uploaded_file(path, also=[EXAMPLES_DIR])
        return await stock_async_move(path)

    image.preprocess = preprocess
    image.move_resource_to_block_cache, image.async_move_resource_to_block_cache = move, async_move
    return image


CLAMPED_SLIDERS = set()  # elem_ids of the sliders whose handlers bring typed values into range themselves
_stock_slider_preprocess = gr.Slider.preprocess


def _slider_preprocess(self, payload):
    if self.elem_id in CLAMPED_SLIDERS:
        return payload
    return _stock_slider_preprocess(self, payload)


def clamped_by_us(slider: gr.Slider) -> gr.Slider:
    """Let a typed value outside the slider's range reach the handler, which brings it into range and sets the
    slider to the value it used. Gradio's own check raises instead: red error badges, and the typed value
    stays in the box as if it had been used.

    Patched on the class, keyed by elem_id: Gradio rebuilds a session's component from its arguments whenever
    an event sends it an update (gr.skip() included), which would drop a patch on the instance."""
    CLAMPED_SLIDERS.add(slider.elem_id)
    gr.Slider.preprocess = _slider_preprocess
    return slider


def text_in_the_api(dropdown: gr.Dropdown, description: str) -> gr.Dropdown:
    """List a dropdown as free text in the API docs (the target class: 1000 labels, or any label text)."""
    dropdown.api_info = lambda: {"type": "string", "description": description}
    return dropdown


def message_of(exc: Exception, where: str) -> str:
    """The user-facing message of a failure; unexpected ones are logged with their traceback."""
    if isinstance(exc, gr.Error):
        return str(exc.message)
    if isinstance(exc, ZoomViTError):
        return str(exc)
    log.error("unexpected error in %s", where, exc_info=exc)
    return f"Something went wrong ({type(exc).__name__}); the server log has the details."


def user_errors(fn):
    """API endpoints: every failure is a gr.Error with a message (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - turned into a message
            raise gr.Error(message_of(exc, fn.__name__)) from None

    return wrapper


def keeps_view(outputs: int, fallback=None):
    """Browser events: a failure is a warning toast and the outputs keep their last good value.

    fallback(*args) may give the outputs to show instead (e.g. a control set back to what is on screen).
    """

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - shown as a toast
                gr.Warning(message_of(exc, fn.__name__), title="Could not do that")
                if fallback is not None:
                    return fallback(*args, **kwargs)
                return (gr.skip(),) * outputs if outputs > 1 else gr.skip()

        return wrapper

    return decorate


def finite_number(value, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ZoomViTError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise ZoomViTError(f"{name} must be a finite number, got {value!r}.")
    return number


def clamped(value, low: float, high: float, name: str) -> tuple[float, bool]:
    """A typed slider value brought into [low, high] (with a warning); True when it had to change."""
    number = finite_number(value, name)
    if number is None:
        raise ZoomViTError(f"{name} is empty: give a number from {low:g} to {high:g}.")
    inside = min(max(number, low), high)
    if inside != number:
        gr.Warning(f"{name} must be from {low:g} to {high:g}; using {inside:g}.", title="Out of range")
    return inside, inside != number


# ----------------------------------------------------------------------------------------------------------
# The explorer: one shared model, handlers that read and write per-session state. The handlers raise; the
# wiring wraps them with `user_errors` (API) or `keeps_view` (browser).
# ----------------------------------------------------------------------------------------------------------


class Explorer:
    def __init__(self, bundle: models.ViTBundle):
        self.bundle = bundle
        self.model_lock = threading.Lock()  # one model run (and one image decode) at a time
        self.graphs = GraphBudget(GRAPHS_KEPT)
        self.num_layers = bundle.num_layers
        self.num_heads = bundle.num_heads
        self.prune_after_default = min(config.PRUNE_AFTER_BLOCK, self.num_layers - 1)

    # ---- sessions ----------------------------------------------------------------------------------------
    def session_for(self, image, session: Session | None) -> Session:
        """The session's analysis if it is for this image, otherwise a new analysis (one model run)."""
        if image is None or not str(image):
            raise ZoomViTError("No image: upload one on the Explore tab first.")
        path = str(image)
        if isinstance(session, Session) and session.path == path:
            return session  # the same upload (Gradio names an upload by its content)
        if not Path(path).is_file():
            raise ZoomViTError("The uploaded file is gone; upload the image again.")
        if Path(path).stat().st_size == 0:
            raise ZoomViTError("The uploaded file is empty.")
        key = _file_key(path)
        if isinstance(session, Session) and session.key == key:
            session.path = path
            return session
        with self.model_lock:  # the decode too: one large image in memory at a time
            loaded = load_image(path)  # clear errors for anything that is not a usable image
            analysis = analyze(self.bundle, loaded)
            probe = zoom_lib.zoom(analysis, policy="always")
            diagnosis = intent.diagnose(analysis, zoom_result=probe)  # computes the intent map on the way
        analysis.grad_rollout()  # numpy only; cached, so the first switch to that view is a pure redraw
        self.graphs.add(analysis)
        release_memory()  # the decode's and the pass's freed memory back to the OS, not held by malloc
        display, geometry = visualization.resized_view(
            loaded.image, analysis.geometry, DISPLAY_SIDE, MIN_DISPLAY_SIDE
        )
        return Session(key, path, analysis, display, geometry, diagnosis)

    def resolve_target(self, session: Session, target) -> int:
        text = "" if target is None else str(target).strip()
        if not text:
            return session.analysis.predicted
        return self.bundle.find_label(text)

    def for_target(self, session: Session, target: int) -> Analysis:
        analysis = session.analysis
        if target == analysis.target:
            return analysis
        with self.model_lock:  # a backward pass (or a forward + backward once the graph was released)
            other = analysis.for_target(target)
        other.grad_rollout(), other.intent()  # both target views cached now: switching between them is a redraw
        return other

    def block_index(self, block) -> int:
        return layer_index(block, self.num_layers)

    def check_after_block(self, after_block) -> int:
        if after_block in (None, ""):
            return self.prune_after_default
        return check_after_block(after_block, self.num_layers)

    # ---- outputs -----------------------------------------------------------------------------------------
    def label_value(self, session: Session, probs=None) -> dict:
        """Top-k as a gr.Label value; a label shown twice (ImageNet has two 'crane's) gets its index."""
        probs = session.analysis.probs if probs is None else probs
        top = top_predictions(self.bundle, probs)
        names = [p.label for p in top]
        value = {}
        for p in top:
            name = p.label if names.count(p.label) == 1 else f"{p.label} [{p.index}]"
            value[name] = p.prob
            if probs is session.analysis.probs:
                session.label_index[name] = p.index
        return value

    def diagnosis_text(self, session: Session) -> str:
        d = session.diagnosis
        return f"**Intent: {d.kind}**: {d.reason}."

    def render(self, session: Session, direction, view, block, head, discard_ratio, target, colormap, opacity,
               note: str = "", skip_same_grid: bool = False):
        """(overlay, caption, heads grid) from the cached analysis: no model run unless the target is new.

        The all-heads grid depends only on the block, the clicked patch, the colours: it is redrawn only when
        one of those changed, and with skip_same_grid (UI events) not even sent again (gr.skip()).
        """
        layer = self.block_index(block)
        number = layer + 1
        alpha = finite_number(opacity, "Opacity")
        if alpha is None or not 0.0 <= alpha <= 1.0:
            raise ZoomViTError(f"Opacity must be from 0 to 1, got {opacity!r}.")
        analysis = session.analysis
        heads = range(self.num_heads)
        head_name = self.head_name(head)
        settings = {"view": view, "block": number, "head": str(head), "discard_ratio": float(discard_ratio),
                    "colormap": colormap, "opacity": alpha}
        if session.patch is not None:
            row, col = session.patch
            attends_to = direction != "attended_by"
            pick = analysis.attended_by_patch if attends_to else analysis.attending_patch
            grid_map = pick(row, col, layer, head)
            image = visualization.heat_overlay(session.display, session.geometry, grid_map, colormap, alpha)
            image = visualization.patch_outline(image, session.geometry, row, col, color="white", width=3)
            gh, gw = analysis.grid
            caption = (
                f"Patch **row {row}, column {col}** (of {gh}×{gw}): "
                f"{'what it attends to' if attends_to else 'what attends to it'} in block {number}, {head_name}."
            )
            settings.update(direction=direction, view="patch")
            grid_maps = lambda: [pick(row, col, layer, h) for h in heads]  # noqa: E731
        else:
            if view in TARGET_VIEWS:
                target_index = self.resolve_target(session, target)
                source = self.for_target(session, target_index)
                settings["target"] = Prediction(
                    target_index, self.bundle.label(target_index), float(analysis.probs[target_index])
                ).as_dict()
            else:
                target_index, source = analysis.predicted, analysis
            grid_map = source.map(view, layer, head, float(discard_ratio))
            image = visualization.heat_overlay(session.display, session.geometry, grid_map, colormap, alpha)
            caption = f"**{VIEW_NAMES.get(view, view)}**" + self.view_detail(
                session, view, number, head_name, discard_ratio, target_index
            )
            grid_maps = lambda: [analysis.cls_map(layer, h) for h in heads]  # noqa: E731
        grid_key = (session.patch, direction if session.patch else None, layer, colormap, alpha)
        if grid_key == session.grid_key and session.grid_image is not None:
            grid = gr.skip() if skip_same_grid else session.grid_image
        else:
            grid = visualization.heads_grid(
                session.display, session.geometry, grid_maps(), [f"head {h}" for h in heads], colormap, alpha,
                HEAD_TILE,
            )
            session.grid_key, session.grid_image = grid_key, grid
        session.shown = Shown(np.asarray(grid_map), caption, colormap, alpha, settings, session.patch)
        if note:
            caption = f"{note}\n\n{caption}"
        return image, caption, grid

    def head_name(self, head) -> str:
        return f"head {head}" if str(head).lstrip("-").isdigit() else f"{head} over heads"

    def view_detail(self, session, view, number, head_name, discard_ratio, target_index) -> str:
        label = self.bundle.label(target_index)
        prob = float(session.analysis.probs[target_index])
        if view == "rollout":
            return (f": attention rolled out through all {self.num_layers} blocks ({head_name}, "
                    f"discard ratio {float(discard_ratio):.2f}); where it looks, for any class.")
        if view in TARGET_VIEWS:
            what = "gradient-weighted rollout" if view == "grad_rollout" else "what the decision depends on"
            return f" for *{label}* ({prob:.1%}): {what}."
        if view == "cls":
            return f": what the class token reads in block {number}, {head_name}."
        return f": attention each patch receives in block {number}, {head_name}."

    # ---- Explore tab -------------------------------------------------------------------------------------
    def explain(self, image, view="rollout", block=-1, head="mean", discard_ratio=config.ROLLOUT_DISCARD_RATIO,
                target="", colormap="jet", opacity=0.5, session=None):
        """Analyse the image: heatmap overlay, top-k predictions, intent diagnosis, caption, all heads."""
        session = self.session_for(image, session)
        session.patch = None
        overlay, caption, grid = self.render(
            session, "attends_to", view, block, head, discard_ratio, target, colormap, opacity
        )
        session.target_text = "" if target is None else str(target)
        return overlay, self.label_value(session), self.diagnosis_text(session), caption, grid, session

    def on_image(self, image, view, block, head, discard_ratio, target, colormap, opacity, session):
        """The image input changed: analyse the new one. Nothing of the previous image stays on screen: a file
        that cannot be analysed leaves empty outputs and the reason, and no session."""
        if image is None:
            return None, None, "", "", None, None
        try:
            return self.explain(image, view, block, head, discard_ratio, target, colormap, opacity, session)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            message = message_of(exc, "on_image")
            gr.Warning(message, title="Could not analyse this file")
            return None, None, f"**Could not analyse this file**: {message}", "", None, None

    def change_target(self, session, direction, view, block, head, discard_ratio, target, colormap, opacity):
        """A new target class: show a view that depends on it (gradient-weighted unless intent is on)."""
        if not isinstance(session, Session):
            raise ZoomViTError("Upload an image first.")
        if view not in TARGET_VIEWS:
            view = "grad_rollout"
        session.patch = None
        rendered = self.render(
            session, direction, view, block, head, discard_ratio, target, colormap, opacity, skip_same_grid=True
        )
        session.target_text = "" if target is None else str(target)
        return (gr.skip(), view, *rendered)

    @staticmethod
    def target_back(session, *args, **kwargs):
        """After a target that failed: the dropdown shows the target that is on screen again."""
        text = session.target_text if isinstance(session, Session) else ""
        return (text, gr.skip(), gr.skip(), gr.skip(), gr.skip())

    def rerender(self, session, direction, view, block, head, discard_ratio, target, colormap, opacity,
                 clear_patch=False):
        """Any view control: redraw from the cached analysis. Typed slider values out of range are brought
        into range, and the slider shows the value used."""
        if not isinstance(session, Session):
            return (gr.skip(),) * 5
        discard_ratio, fix_discard = clamped(discard_ratio, 0.0, 0.95, "Discard ratio")
        opacity, fix_opacity = clamped(opacity, 0.0, 1.0, "Opacity")
        if clear_patch:
            session.patch = None
        rendered = self.render(
            session, direction, view, block, head, discard_ratio, target, colormap, opacity, skip_same_grid=True
        )
        return (*rendered, discard_ratio if fix_discard else gr.skip(), opacity if fix_opacity else gr.skip())

    def change_view(self, session, direction, view, block, head, discard_ratio, target, colormap, opacity):
        """A new view, or the clear button, replaces the patch inspection."""
        return self.rerender(session, direction, view, block, head, discard_ratio, target, colormap, opacity,
                             clear_patch=True)

    def inspect_at(self, session, x_display, y_display, view_args, note="", skip_same_grid=False):
        patch = None
        if x_display is not None:
            patch = session.geometry.pixel_to_patch(x_display, y_display)
        session.patch = patch
        if patch is None:
            note = (note + " " if note else "") + (
                "That point is outside what the model sees (the white box); showing the map instead."
            )
            gr.Warning("That point is outside the part of the image the model sees.")
            overlay, caption, grid = self.render(session, *view_args, note=note, skip_same_grid=skip_same_grid)
            overlay = visualization.draw_box(overlay, session.geometry.view_box(), color="white", width=2)
            return overlay, caption, grid
        return self.render(session, *view_args, note=note, skip_same_grid=skip_same_grid)

    def inspect_patch(self, image, x=None, y=None, direction="attends_to", view="rollout", block=-1, head="mean",
                      discard_ratio=config.ROLLOUT_DISCARD_RATIO, target="", colormap="jet", opacity=0.5,
                      session=None):
        """The patch at (x, y), in the image's own pixels: its attention map, outlined, with its row and column
        named. Without x and y: the image centre, and the caption says so. Returns the x, y used."""
        x, y = finite_number(x, "x"), finite_number(y, "y")
        if (x is None) != (y is None):
            raise ZoomViTError("Give both x and y (image pixels), or neither for the image centre.")
        session = self.session_for(image, session)
        ow, oh = session.analysis.loaded.original_size
        note = ""
        if x is None:
            x, y = ow / 2, oh / 2  # a true centre: on a 1-pixel image, pixel 0's corner is outside the crop
            note = f"No x, y given: the image centre (x={x:g}, y={y:g})."
        view_args = (direction, view, block, head, discard_ratio, target, colormap, opacity)
        if not (0 <= x < ow and 0 <= y < oh):  # checked here: 1e308 would overflow on the way to a patch
            overlay, caption, grid = self.inspect_at(session, None, None, view_args, note)
            return overlay, caption, grid, gr.skip(), gr.skip(), session
        xd, yd = session.original_to_display(x, y)
        overlay, caption, grid = self.inspect_at(session, xd, yd, view_args, note)
        return overlay, caption, grid, x, y, session

    def click(self, session, direction, view, block, head, discard_ratio, target, colormap, opacity,
              evt: gr.SelectData):
        """A click on the overlay: evt.index is (x, y) in the served (display) image's pixels."""
        if not isinstance(session, Session):
            raise ZoomViTError("Upload an image first.")
        xd, yd = (float(v) for v in evt.index[:2])
        view_args = (direction, view, block, head, discard_ratio, target, colormap, opacity)
        overlay, caption, grid = self.inspect_at(session, xd, yd, view_args, skip_same_grid=True)
        x, y = session.display_to_original(xd, yd)
        return overlay, caption, grid, round(x), round(y)

    def pick_target(self, session, direction, view, block, head, discard_ratio, colormap, opacity,
                    evt: gr.SelectData):
        """A click on one of the top-k: make it the target class and show the gradient-weighted view."""
        if not isinstance(session, Session):
            return (gr.skip(),) * 5
        index = session.label_index.get(evt.value)
        if index is None:
            index = self.bundle.find_label(evt.value)
        if view not in TARGET_VIEWS:
            view = "grad_rollout"
        session.patch = None
        overlay, caption, grid = self.render(
            session, direction, view, block, head, discard_ratio, str(index), colormap, opacity, skip_same_grid=True
        )
        session.target_text = str(index)
        return str(index), view, overlay, caption, grid

    def target_choices(self, session):
        """Top-k first (with their probabilities), then every label: the dropdown is searchable."""
        if not isinstance(session, Session):
            return gr.skip()
        probs = session.analysis.probs
        top = [p.index for p in session.analysis.top()]
        rest = [i for i in range(len(probs)) if i not in set(top)]
        choices = [("predicted class", "")]
        choices += [(f"{self.bundle.label(i)} ({probs[i]:.1%})", str(i)) for i in top]
        choices += [(f"{self.bundle.label(i)} [{i}]", str(i)) for i in rest]
        return gr.update(choices=choices, value="")

    # ---- Zoom & prune tab --------------------------------------------------------------------------------
    def zoom(self, image, policy="adaptive", session=None):
        """Crop where the model looks and classify again: box, crop, before/after predictions, reason."""
        session = self.session_for(image, session)
        with self.model_lock:
            result = zoom_lib.zoom(session.analysis, policy=policy)
        session.zoom_result = result
        x0, y0, x1, y1 = result.box  # in the image's own pixels
        box = (*session.original_to_display(x0, y0), *session.original_to_display(x1, y1))
        boxed = visualization.draw_box(session.display, box, color=(255, 40, 40), width=3)
        crop = result.crop.copy()
        crop.thumbnail((CROP_SIDE, CROP_SIDE), Image.Resampling.BILINEAR)
        return (
            boxed, crop, self.label_value(session, result.probs_before), self.label_value(session, result.probs_after),
            self.zoom_text(result), session,
        )

    @staticmethod
    def zoom_text(result) -> str:
        x0, y0, x1, y1 = result.box
        verdict = "**Zoomed in**" if result.zoomed else "**Kept the whole image**"
        source = getattr(result, "source", None)
        return (
            f"{verdict}: {result.reason}. Box ({x0:.0f}, {y0:.0f}) – ({x1:.0f}, {y1:.0f}) in image pixels"
            + (f", from the {source.replace('_', ' ')} map." if source else ".")
        )

    def toggle_zoom(self, enabled, image, policy, session):
        if not enabled:
            return (gr.skip(), gr.update(visible=False), None, None, None, None, "", session)
        outputs = self.zoom(image, policy, session)
        return (gr.skip(), gr.update(visible=True), *outputs)

    @staticmethod
    def zoom_off(*args, **kwargs):
        """After a zoom that failed: the checkbox is off again, as nothing is zoomed."""
        return (False, gr.update(visible=False), *(gr.skip(),) * 6)

    def prune(self, image, keep=config.PRUNE_KEEP, after_block=None, mode=config.PRUNE_MODE, session=None):
        """Drop tokens after a block: kept tokens on the image, predictions before/after, tokens, MACs, ms.

        keep: the share of patch tokens kept, from KEEP_MIN to 1."""
        keep = finite_number(keep, "Keep")
        if keep is None or not KEEP_MIN <= keep <= 1.0:
            raise ZoomViTError(f"Keep is the share of patch tokens kept: from {KEEP_MIN:g} to 1, got {keep!r}.")
        after_block = self.check_after_block(after_block)
        session = self.session_for(image, session)
        with self.model_lock:
            result = pruning.prune(session.analysis, keep, after_block, mode, timing_repeats=TIMING_REPEATS)
        session.prune_result = result
        kept = visualization.token_mask_overlay(session.display, session.geometry, result.kept_mask)
        kept = visualization.draw_box(kept, session.geometry.view_box(), color="white", width=2)  # what it sees
        before = self.label_value(session, result.probs_before)
        after = self.label_value(session, result.probs_after)
        return kept, before, after, self.prune_text(result), session

    def prune_text(self, result) -> str:
        verdict = "decision **kept**" if result.decision_kept else "decision **changed**"
        runs_before, runs_after = result.latency_before_runs, result.latency_after_runs

        def timing(median, runs):
            return f"{median:.1f} ms ({min(runs):.1f}–{max(runs):.1f})" if runs else "not measured"

        ratio = f" ({result.latency_after_ms / result.latency_before_ms:.0%})" if runs_before else ""
        return (
            f"Keep **{result.keep:.2f}** of the patch tokens ({result.keep:.0%}) after block {result.after_block} "
            f"of {self.num_layers} ({result.mode} mode): {verdict}.\n\n"
            f"| | before | after |\n|---|---|---|\n"
            f"| tokens | {result.tokens_before} | {result.tokens_after} |\n"
            f"| MACs | {result.macs_before / 1e9:.3f} G | {result.macs_after / 1e9:.3f} G "
            f"({result.macs_after / result.macs_before:.0%}) |\n"
            f"| time: median of {len(runs_before)} (range) | {timing(result.latency_before_ms, runs_before)} | "
            f"{timing(result.latency_after_ms, runs_after)}{ratio} |\n\n"
            f"Times are measured on this server's CPU, shared with other users and the app itself: a difference "
            f"inside the ranges is noise, and a small model at batch 1 gains less than its MACs suggest. MACs do "
            f"not depend on the machine."
        )

    def prune_ui(self, image, keep, after_block, mode, session):
        """The controls: a typed keep out of range is brought into range and the slider shows the value used."""
        keep, fixed = clamped(keep, KEEP_MIN, 1.0, "Keep")
        outputs = self.prune(image, keep, after_block, mode, session)
        return (keep if fixed else gr.skip(), *outputs)

    def prune_if_stale(self, image, keep, after_block, mode, session):
        """Opening the tab: run prune once for the current image and settings, not again."""
        if image is None or not isinstance(session, Session):
            return (gr.skip(),) * 6
        shown = session.prune_result
        if shown is not None and (shown.keep, shown.after_block, shown.mode) == (float(keep), int(after_block), mode):
            return (gr.skip(),) * 6
        return self.prune_ui(image, keep, after_block, mode, session)

    # ---- exports -----------------------------------------------------------------------------------------
    def write_export(self, session: Session, tab: str, picture: Image.Image, result: dict) -> list[str]:
        """The picture as PNG and the result as JSON, in a fresh folder under Gradio's temp folder (swept)."""
        os.makedirs(get_upload_folder(), exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="zoomvit-export-", dir=get_upload_folder()))
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(session.path).stem)[:40] or "image"
        png, js = folder / f"zoomvit-{tab}-{stem}.png", folder / f"zoomvit-{tab}-{stem}.json"
        picture.save(png, optimize=False)
        js.write_text(json.dumps(result, indent=1))
        return [str(png), str(js)]

    def result_header(self, session: Session) -> dict:
        a = session.analysis
        return {
            "model": self.bundle.name,
            "image": {"file": Path(session.path).name, "width": a.loaded.original_size[0],
                      "height": a.loaded.original_size[1]},
            "conventions": {"blocks": f"numbered 1..{self.num_layers}", "keep": "share of patch tokens, 0..1",
                            "boxes": "x0, y0, x1, y1 in the image's own pixels"},
            "top": [p.as_dict() for p in a.top()],
            "diagnosis": session.diagnosis.as_dict(),
        }

    def export_explore(self, session):
        if not isinstance(session, Session) or session.shown is None:
            raise ZoomViTError("Nothing to export yet: upload an image first.")
        shown, analysis = session.shown, session.analysis
        image = visualization.heat_overlay(
            analysis.loaded.image, analysis.geometry, shown.grid_map, shown.colormap, shown.alpha
        )
        if shown.patch is not None:
            width = max(2, image.width // 250)
            image = visualization.patch_outline(image, analysis.geometry, *shown.patch, color="white", width=width)
        caption = f"{Path(self.bundle.name).name}: {plain_text(shown.caption)}"
        picture = visualization.figure_with_legend(image, shown.colormap, caption)
        result = self.result_header(session)
        result.update(
            caption=plain_text(shown.caption), settings=shown.settings, grid=list(analysis.grid),
            patch=None if shown.patch is None else {"row": shown.patch[0], "column": shown.patch[1]},
            map=np.round(shown.grid_map.astype(np.float64), 4).tolist(),
        )
        return self.write_export(session, "explore", picture, result)

    def export_zoom_prune(self, session):
        if not isinstance(session, Session) or (session.zoom_result is None and session.prune_result is None):
            raise ZoomViTError("Nothing to export yet: zoom or prune first.")
        analysis = session.analysis
        image = analysis.loaded.image
        lines, result = [], self.result_header(session)
        if session.prune_result is not None:
            image = visualization.token_mask_overlay(image, analysis.geometry, session.prune_result.kept_mask)
            lines.append(plain_text(self.prune_text(session.prune_result).split("\n\n")[0]))
            lines.append(f"Grey: the patch tokens dropped after block {session.prune_result.after_block}.")
            result["prune"] = session.prune_result.as_dict()
        if session.zoom_result is not None:
            box = [c * analysis.geometry.scale for c in session.zoom_result.box]
            image = visualization.draw_box(image, box, color=(255, 40, 40), width=max(3, image.width // 200))
            lines.append("Red: the zoom box. " + plain_text(self.zoom_text(session.zoom_result)))
            result["zoom"] = session.zoom_result.as_dict()
        caption = f"{Path(self.bundle.name).name}: " + "\n".join(lines)
        return self.write_export(session, "zoom-prune", visualization.figure_with_legend(image, None, caption), result)

    # ---- a new image -------------------------------------------------------------------------------------
    @staticmethod
    def reset():
        """Before a new analysis: predicted-class target, no zoom, and no output of the old image left."""
        return ("", False, gr.update(visible=False), None, None, None, "", None, None,
                None, None, "", "", None, None, None)


# ----------------------------------------------------------------------------------------------------------
# Layout and wiring
# ----------------------------------------------------------------------------------------------------------


def _examples():
    """([[path], ...], [caption, ...]) from assets/examples.csv, in its order; none when assets/ is not there
    (it ships with the repository, not with a wheel)."""
    index = EXAMPLES_DIR / "examples.csv"
    if not index.is_file():
        return [], []
    with open(index, newline="") as f:
        rows = [row for row in csv.DictReader(f) if (EXAMPLES_DIR / row["file"]).is_file()]
    return [[str(EXAMPLES_DIR / row["file"])] for row in rows], [row["caption"] for row in rows]


def build_demo(bundle: models.ViTBundle) -> gr.Blocks:
    ex = Explorer(bundle)
    last = ex.num_layers
    blocks = [(f"{b} (last)" if b == last else str(b), b) for b in range(1, last + 1)]
    heads = [("mean over heads", "mean"), ("max over heads", "max"), ("min over heads", "min")]
    heads += [(f"head {h}", str(h)) for h in range(ex.num_heads)]
    gh, gw = geometry_for(bundle, (bundle.input_size[1], bundle.input_size[0])).grid
    all_targets = [("predicted class", "")]
    all_targets += [(f"{bundle.label(i)} [{i}]", str(i)) for i in range(len(bundle.id2label))]
    examples, example_labels = _examples()
    image_buttons = ["download", "fullscreen"]  # no "share": it only works on Hugging Face Spaces

    with gr.Blocks(title="ZoomViT Explorer", analytics_enabled=False, delete_cache=(3600, TEMP_MAX_AGE_S)) as demo:
        session = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=_release)
        gr.Markdown(
            f"## ZoomViT Explorer\n"
            f"See where **{Path(bundle.name).name}** looks ({last} blocks × {ex.num_heads} heads, "
            f"{gh}×{gw} patches of {bundle.patch_size} px), click any patch, zoom in on it and prune what it ignores.\n\n"
            f"<small>Model family: {bundle.adapter.describe()}. Running on {bundle.device} in {bundle.dtype_name}."
            "</small>",
            elem_id="header",
        )
        with gr.Accordion("About: what the maps, the diagnosis, zoom and pruning mean", open=False, elem_id="about"):
            gr.Markdown(ABOUT.format(layers=last))
        with gr.Tabs():
            with gr.Tab("Explore", id="explore"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=280):
                        image = hand_over_the_file(gr.Image(
                            label="Image", type="filepath", sources=["upload", "clipboard"], image_mode=None,
                            height=300, elem_id="image", buttons=["fullscreen"],
                        ))
                        if examples:
                            gr.Examples(
                                examples, inputs=[image], example_labels=example_labels,
                                label="Examples: photos (CC0 / public domain) and drawings", cache_examples=False,
                                examples_per_page=12,
                            )
                        label = gr.Label(
                            num_top_classes=config.TOP_K, label="Prediction (click one to explain it)",
                            elem_id="prediction",
                        )
                        diagnosis = gr.Markdown(elem_id="diagnosis", label="Intent diagnosis")
                    with gr.Column(scale=3, min_width=360):
                        overlay = gr.Image(
                            label="Where it looks (click a patch)", type="pil", format="jpeg", interactive=False,
                            elem_id="overlay", buttons=image_buttons,
                        )
                        legend = gr.HTML(legend_html("jet"), elem_id="legend")
                        caption = gr.Markdown(elem_id="caption", label="Caption")
                        with gr.Row():
                            view = gr.Radio(
                                VIEWS, value="rollout", label="View", scale=3, elem_id="view",
                                info="rollout, CLS, attention: where it looks (any class); gradient-weighted, "
                                     "intent: what makes it pick the target class",
                            )
                            direction = gr.Radio(
                                DIRECTIONS, value="attends_to", label="Clicked patch shows", scale=2,
                                elem_id="direction",
                            )
                        with gr.Row():
                            block = gr.Dropdown(
                                blocks, value=last, label="Block", info=f"1 to {last}: CLS, attention, clicked patch",
                                elem_id="block",
                            )
                            head = gr.Dropdown(
                                heads, value="mean", label="Head", info="one head, or mean / max / min (rollout too)",
                                elem_id="head",
                            )
                            target = text_in_the_api(gr.Dropdown(
                                all_targets, value="", label="Target class",
                                info="what gradient-weighted and intent explain; type to search", filterable=True,
                                allow_custom_value=True, elem_id="target",
                            ), "class index or label text; empty: the predicted class")
                        with gr.Row():
                            discard = clamped_by_us(gr.Slider(
                                0.0, 0.95, value=config.ROLLOUT_DISCARD_RATIO, step=0.05, label="Discard ratio",
                                info="rollout: share of the weakest attention dropped in each block",
                                elem_id="discard",
                            ))
                            opacity = clamped_by_us(gr.Slider(
                                0.0, 1.0, value=0.5, step=0.05, label="Opacity", info="of the heatmap",
                                elem_id="opacity",
                            ))
                            colormap = gr.Dropdown(COLORMAPS, value="jet", label="Colormap", elem_id="colormap")
                        with gr.Row():
                            clear = gr.Button("Clear patch selection", size="sm")
                        with gr.Accordion("Inspect a patch by its pixel coordinates", open=False):
                            with gr.Row():
                                x_in = gr.Number(label="x (image pixels)", value=None, precision=0, elem_id="x")
                                y_in = gr.Number(label="y (image pixels)", value=None, precision=0, elem_id="y")
                                inspect_btn = gr.Button("Inspect", elem_id="inspect")
                        with gr.Accordion("All heads of this block: CLS attention, or the clicked patch's", open=True):
                            heads_img = gr.Image(
                                label="All heads", show_label=False, type="pil", format="jpeg", interactive=False,
                                elem_id="heads", buttons=image_buttons,
                            )
                        with gr.Row():
                            export_btn = gr.Button("Export: full-size PNG + JSON", size="sm", elem_id="export")
                        export_files = gr.File(label="Export", file_count="multiple", interactive=False,
                                               elem_id="export_files")

            with gr.Tab("Zoom & prune", id="zoomprune") as zp_tab:
                gr.Markdown("Works on the image from the **Explore** tab.")
                with gr.Row():
                    zoom_on = gr.Checkbox(False, label="Zoom in on where the model looks", elem_id="zoom_on")
                    policy = gr.Radio(
                        POLICIES, value="adaptive", label="Zoom policy", elem_id="policy",
                        info="adaptive: only when the box is small, and then 70% whole image + 30% crop",
                    )
                with gr.Group(visible=False) as zoom_group:
                    with gr.Row():
                        zoom_box = gr.Image(
                            label="Zoom box", type="pil", format="jpeg", interactive=False, height=320,
                            elem_id="zoom_box", buttons=image_buttons,
                        )
                        zoom_crop = gr.Image(
                            label="Crop", type="pil", format="jpeg", interactive=False, height=320, elem_id="zoom_crop",
                            buttons=image_buttons,
                        )
                    zoom_info = gr.Markdown(label="Zoom decision", elem_id="zoom_info")
                    with gr.Row():
                        zoom_before = gr.Label(num_top_classes=3, label="Before (whole image)")
                        zoom_after = gr.Label(num_top_classes=3, label="After zoom")
                gr.Markdown("### Token pruning")
                with gr.Row():
                    keep = clamped_by_us(gr.Slider(
                        KEEP_MIN, 1.0, value=config.PRUNE_KEEP, step=0.05, label="Keep",
                        info="share of patch tokens kept after the block (0.1 to 1.0); the class token always stays",
                        elem_id="keep",
                    ))
                    after_block = gr.Dropdown(
                        list(range(1, last)), value=ex.prune_after_default, label="Prune after block",
                        info=f"blocks after it (up to {last}) see only the kept tokens", elem_id="after_block",
                    )
                    mode = gr.Radio(MODES, value=config.PRUNE_MODE, label="Mode", elem_id="mode")
                with gr.Row():
                    kept_img = gr.Image(
                        label="Kept tokens (dropped ones greyed out)", type="pil", format="jpeg", interactive=False,
                        elem_id="kept", buttons=image_buttons,
                    )
                    with gr.Column():
                        with gr.Row():
                            prune_before = gr.Label(num_top_classes=3, label="Before", elem_id="prune_before")
                            prune_after = gr.Label(num_top_classes=3, label="After pruning", elem_id="prune_after")
                        prune_stats = gr.Markdown(elem_id="prune_stats", label="Pruning cost")
                with gr.Row():
                    zp_export_btn = gr.Button("Export: full-size PNG + JSON", size="sm", elem_id="zp_export")
                zp_export_files = gr.File(label="Export", file_count="multiple", interactive=False,
                                          elem_id="zp_export_files")

        # ---- wiring ----------------------------------------------------------------------------------------
        view_controls = [direction, view, block, head, discard, target, colormap, opacity]
        view_outputs = [overlay, caption, heads_img]
        explain_inputs = [image, view, block, head, discard, target, colormap, opacity, session]
        explain_outputs = [overlay, label, diagnosis, caption, heads_img, session]
        inspect_inputs = [image, x_in, y_in, *view_controls, session]
        inspect_outputs = [*view_outputs, x_in, y_in, session]
        zoom_outputs = [zoom_box, zoom_crop, zoom_before, zoom_after, zoom_info, session]
        prune_inputs = [image, keep, after_block, mode, session]
        prune_outputs = [kept_img, prune_before, prune_after, prune_stats, session]
        private = dict(api_visibility="private")
        quiet = dict(show_progress="hidden", trigger_mode="always_last", **private)
        model_run = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=1)  # one model, and a queue

        # The API first (events are named after their function: these take the plain names). Image first, every
        # option with a default; errors are errors.
        hidden = lambda: gr.Button(visible=False)  # noqa: E731
        hidden().click(user_errors(ex.explain), explain_inputs, explain_outputs, api_name="explain", **model_run)
        hidden().click(user_errors(ex.inspect_patch), inspect_inputs, inspect_outputs, api_name="inspect_patch",
                       **model_run)
        hidden().click(user_errors(ex.zoom), [image, policy, session], zoom_outputs, api_name="zoom", **model_run)
        hidden().click(user_errors(ex.prune), prune_inputs, prune_outputs, api_name="prune", **model_run)

        # A new image: clear everything of the old one, then analyse.
        image.change(
            ex.reset, None,
            [target, zoom_on, zoom_group, kept_img, prune_before, prune_after, prune_stats, x_in, y_in,
             overlay, label, diagnosis, caption, heads_img, export_files, zp_export_files],
            queue=False, show_progress="hidden", **private,
        ).then(
            ex.on_image, explain_inputs, explain_outputs, **model_run, **private,
        ).then(ex.target_choices, [session], [target], show_progress="hidden", **private)

        rerender = keeps_view(5)(ex.rerender)
        slider_outputs = [*view_outputs, discard, opacity]
        view.input(keeps_view(5)(ex.change_view), [session, *view_controls], slider_outputs, **quiet)
        for control in (direction, block, head, colormap, discard, opacity):
            control.input(rerender, [session, *view_controls], slider_outputs, **quiet)
        target.input(
            keeps_view(5, fallback=ex.target_back)(ex.change_target), [session, *view_controls],
            [target, view, *view_outputs], trigger_mode="always_last", **model_run, **private,
        )
        colormap.input(legend_html, [colormap], [legend], queue=False, show_progress="hidden", **private)
        clear.click(keeps_view(5)(ex.change_view), [session, *view_controls], slider_outputs, **quiet)
        overlay.select(
            keeps_view(5)(ex.click), [session, *view_controls], [*view_outputs, x_in, y_in], show_progress="hidden",
            trigger_mode="always_last", **private,
        )
        inspect_btn.click(keeps_view(6)(ex.inspect_patch), inspect_inputs, inspect_outputs, **model_run, **private)
        label.select(
            keeps_view(5)(ex.pick_target), [session, direction, view, block, head, discard, colormap, opacity],
            [target, view, *view_outputs], show_progress="hidden", **model_run, **private,
        )
        export_btn.click(keeps_view(1)(ex.export_explore), [session], [export_files], **private)

        for trigger in (zoom_on.input, policy.input):
            trigger(keeps_view(8, fallback=ex.zoom_off)(ex.toggle_zoom), [zoom_on, image, policy, session],
                    [zoom_on, zoom_group, *zoom_outputs], trigger_mode="always_last", **model_run, **private)

        # .input: a drag, the arrow keys and a typed value all end up here (.release missed the last two).
        for trigger in (keep.input, after_block.input, mode.input):
            trigger(keeps_view(6)(ex.prune_ui), prune_inputs, [keep, *prune_outputs], trigger_mode="always_last",
                    **model_run, **private)
        zp_tab.select(keeps_view(6)(ex.prune_if_stale), prune_inputs, [keep, *prune_outputs], **model_run, **private)
        zp_export_btn.click(keeps_view(1)(ex.export_zoom_prune), [session], [zp_export_files], **private)


    JANITOR.protectors.append(lambda: set().union(*(getattr(b, "keep_in_cache", set()) for b in demo.blocks.values())))
    JANITOR.start()
    demo.queue(default_concurrency_limit=4, max_size=64)
    return demo


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def launch_options(host: str = "127.0.0.1", port: int = 7860) -> dict:
    """How the app is served: local only, no share link, capped uploads, bounded session memory and temp folder."""
    return dict(
        server_name=host,
        server_port=port,
        share=False,
        max_file_size=MAX_UPLOAD,
        state_session_capacity=MAX_SESSIONS,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        show_error=False,
        footer_links=["api"],
        theme=gr.themes.Default(primary_hue="orange", secondary_hue="blue"),
        css=CSS,
        app_kwargs={"middleware": [Middleware(SweepAfterUploads)]},
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="app.py", description="ZoomViT Explorer web app.")
    parser.add_argument(
        "--model", default=None,
        help=f"hub id or local model folder (default: ${config.MODEL_ENV_VAR}, else {config.DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--device", default=None,
        help=f"{config.DEVICE_HELP} (default: ${config.DEVICE_ENV_VAR}, else auto)",
    )
    parser.add_argument(
        "--dtype", default=None,
        help=f"{config.DTYPE_HELP} (default: ${config.DTYPE_ENV_VAR}, else float32)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from cli import port_free

    if not port_free(args.host, args.port):  # before the slow model load
        print(f"zoomvit: error: port {args.port} on {args.host} is in use; pick another with --port.", file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        # Resolves --model, --device, --dtype or their environment variables; a bad device fails before the load.
        bundle = models.load_model(args.model, args.device, args.dtype)
    except ZoomViTError as exc:
        print(f"zoomvit: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    one_blas_thread()
    demo = build_demo(bundle)
    print(f"ZoomViT Explorer: {bundle.name} on http://{args.host}:{args.port}", file=sys.stderr)
    demo.launch(**launch_options(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
