"""ZoomViT Explorer, the web app: see where a Vision Transformer looks, click a patch, zoom in, prune tokens.

    python app.py [--model HUB_ID_OR_FOLDER] [--host 127.0.0.1] [--port 7860]

UI only: every number comes from the library (vit_analyzer, zoom, pruning, intent, visualization).

Speed: the model runs on an upload, a target-class change, zoom and prune. Each session keeps its `Analysis`
in a gr.State (Gradio stores the object as is, without copying it); every other control re-renders from
it, on a copy of the image at most DISPLAY_SIDE pixels wide (benchmarks/bench_views.py measures this path).

API: /explain, /inspect_patch, /zoom and /prune take the image first and plain values after it, each with a
default. A call with an image the session has already analysed reuses that analysis (matched by content).
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
# numpy's OpenBLAS on one thread: see `one_blas_thread` (this covers `python app.py`, where numpy is not
# imported yet; main() also switches an already loaded OpenBLAS, as under `zoomvit serve`).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import weakref  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

import config  # noqa: E402
import intent  # noqa: E402
import pruning  # noqa: E402
import visualization  # noqa: E402
import vit_analyzer  # noqa: E402
import zoom as zoom_lib  # noqa: E402
from vit_analyzer import ZoomViTError  # noqa: E402

log = logging.getLogger("zoomvit.app")

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "assets"

DISPLAY_SIDE = 768  # images are drawn at most this many pixels on their longest side
CROP_SIDE = 384  # the zoom crop, shown beside the image
HEAD_TILE = 128  # one tile of the all-heads grid
MAX_UPLOAD = "25mb"  # Gradio refuses larger uploads; vit_analyzer.load_image also caps the pixel count
MAX_SESSIONS = 64  # sessions whose state the server keeps (oldest dropped first)
SESSION_TTL_S = 2 * 3600  # a session's analysis is dropped after this long without an update
GRAPHS_KEPT = 4  # analyses that keep their autograd graph (a target change then costs only a backward)
TIMING_REPEATS = 3  # prune: median of this many timed runs, before and after

VIEWS = [
    ("Rollout", "rollout"),
    ("Gradient-weighted", "grad_rollout"),
    ("Intent", "intent"),
    ("CLS attention", "cls"),
    ("Attention", "attention"),
]
VIEW_NAMES = dict((value, label) for label, value in VIEWS)
COLORMAPS = ["jet", "turbo", "viridis", "inferno", "magma", "plasma", "hot", "gray"]
DIRECTIONS = [("what it attends to", "attends_to"), ("what attends to it", "attended_by")]
POLICIES = [("adaptive: zoom only if it helps", "adaptive"), ("always zoom", "always")]
MODES = [("analysis (intent ranking, look-ahead)", "analysis"), ("efficiency (no look-ahead, merge)", "efficiency")]

CSS = """
#overlay img, #overlay canvas { cursor: crosshair; }
.zv-legend { display: flex; align-items: center; gap: .5em; font-size: .85em; margin: 0 .25em; }
.zv-legend .bar { flex: 1; height: 10px; border-radius: 3px; }
"""


# ----------------------------------------------------------------------------------------------------------
# Session state
# ----------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Session:
    """One user's cached analysis and what the UI drew from it. Lives in a gr.State, never in a global."""

    key: str  # content hash of the image file
    analysis: vit_analyzer.Analysis
    display: Image.Image  # the working image, at most DISPLAY_SIDE pixels
    geometry: vit_analyzer.Geometry  # the model's geometry, for `display`'s pixels
    diagnosis: intent.Diagnosis
    label_index: dict = field(default_factory=dict)  # top-k label text (as shown) -> class index
    patch: tuple | None = None  # the clicked patch (row, col), if any
    prune_key: tuple | None = None  # the settings of the prune result on screen
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


# Component tweaks are made on the instances: subclassing a Gradio component makes Gradio write a .pyi stub
# beside this file at import time.


def hand_over_the_file(image: gr.Image) -> gr.Image:
    """Make an upload component pass the uploaded file's path to our own loader untouched.

    The stock preprocess opens the file with Pillow first, so a broken file fails inside Gradio with a bare
    "Error"; `vit_analyzer.load_image` gives a message that says what is wrong.
    """
    stock = image.preprocess

    def preprocess(payload):
        if payload is not None and getattr(payload, "path", None):
            return str(payload.path)
        return stock(payload)  # nothing, or a data: URL

    image.preprocess = preprocess
    return image


def text_in_the_api(dropdown: gr.Dropdown, description: str) -> gr.Dropdown:
    """List a dropdown as free text in the API docs (the target class: 1000 labels, or any label text)."""
    dropdown.api_info = lambda: {"type": "string", "description": description}
    return dropdown


def user_errors(fn):
    """Turn every failure into a gr.Error message (never a traceback); unexpected ones are logged."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ZoomViTError as exc:
            raise gr.Error(str(exc)) from None
        except Exception as exc:
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"Something went wrong ({type(exc).__name__}: {exc}).") from None

    return wrapper


# ----------------------------------------------------------------------------------------------------------
# The explorer: one shared model, handlers that read and write per-session state
# ----------------------------------------------------------------------------------------------------------


class Explorer:
    def __init__(self, bundle: vit_analyzer.ViTBundle):
        self.bundle = bundle
        self.model_lock = threading.Lock()  # one model run at a time: they share the weights and the cores
        self.graphs = GraphBudget(GRAPHS_KEPT)
        self.num_layers = bundle.num_layers
        self.num_heads = bundle.num_heads
        self.prune_after_default = min(config.PRUNE_AFTER_BLOCK, self.num_layers)

    # ---- sessions ----------------------------------------------------------------------------------------
    def session_for(self, image, session: Session | None) -> Session:
        """The session's analysis if it is for this image, otherwise a new analysis (one model run)."""
        if image is None or (isinstance(image, str) and not image):
            raise gr.Error("No image: upload one first.")
        path = Path(image)
        if not path.is_file():
            raise gr.Error("The uploaded file is gone; upload the image again.")
        if path.stat().st_size == 0:
            raise gr.Error("The uploaded file is empty.")
        key = _file_key(path)
        if isinstance(session, Session) and session.key == key:
            return session
        loaded = vit_analyzer.load_image(path)  # clear errors for anything that is not a usable image
        with self.model_lock:
            analysis = vit_analyzer.analyze(self.bundle, loaded)
            probe = zoom_lib.zoom(analysis, policy="always")
            diagnosis = intent.diagnose(analysis, zoom_result=probe)  # computes the intent map on the way
        analysis.grad_rollout()  # numpy only; cached, so the first switch to that view is a pure redraw
        self.graphs.add(analysis)
        display, geometry = visualization.resized_view(loaded.image, analysis.geometry, DISPLAY_SIDE)
        return Session(key, analysis, display, geometry, diagnosis)

    def resolve_target(self, session: Session, target) -> int:
        text = "" if target is None else str(target).strip()
        if not text:
            return session.analysis.predicted
        return self.bundle.find_label(text)

    def for_target(self, session: Session, target: int) -> vit_analyzer.Analysis:
        analysis = session.analysis
        if target == analysis.target:
            return analysis
        with self.model_lock:  # a backward pass (or a forward + backward once the graph was released)
            other = analysis.for_target(target)
        other.grad_rollout(), other.intent()  # both target views cached now: switching between them is a redraw
        return other

    # ---- outputs -----------------------------------------------------------------------------------------
    def label_value(self, session: Session, probs=None) -> dict:
        """Top-k as a gr.Label value; a label shown twice (ImageNet has two 'crane's) gets its index."""
        probs = session.analysis.probs if probs is None else probs
        top = vit_analyzer.top_predictions(self.bundle, probs)
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

    def render(self, session: Session, direction, view, layer, head, discard_ratio, target, colormap, opacity,
               note: str = "", skip_same_grid: bool = False):
        """(overlay, caption, heads grid) from the cached analysis: no model run unless the target is new.

        The all-heads grid depends only on the layer, the clicked patch, the colours: it is redrawn only when
        one of those changed, and with skip_same_grid (UI events) not even sent again (gr.skip()).
        """
        layer = int(layer)
        if -self.num_layers <= layer < 0:
            layer += self.num_layers  # -1: the last layer
        alpha = float(opacity)
        analysis = session.analysis
        heads = range(self.num_heads)
        head_name = self.head_name(head)
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
                f"{'what it attends to' if attends_to else 'what attends to it'} in layer {layer}, {head_name}."
            )
            grid_maps = lambda: [pick(row, col, layer, h) for h in heads]  # noqa: E731
        else:
            if view in ("grad_rollout", "intent"):  # the only views that depend on the target class
                target_index = self.resolve_target(session, target)
                source = self.for_target(session, target_index)
            else:
                target_index, source = analysis.predicted, analysis
            grid_map = source.map(view, layer, head, float(discard_ratio))
            image = visualization.heat_overlay(session.display, session.geometry, grid_map, colormap, alpha)
            caption = f"**{VIEW_NAMES.get(view, view)}**" + self.view_detail(
                session, view, layer, head_name, discard_ratio, target_index
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
        if note:
            caption = f"{note}\n\n{caption}"
        return image, caption, grid

    def head_name(self, head) -> str:
        return f"head {head}" if str(head).lstrip("-").isdigit() else f"{head} over heads"

    def view_detail(self, session, view, layer, head_name, discard_ratio, target_index) -> str:
        label = self.bundle.label(target_index)
        prob = float(session.analysis.probs[target_index])
        if view == "rollout":
            fusion = head_name if "over heads" in head_name else "mean over heads"
            return f": attention rolled out through all layers ({fusion}, discard ratio {float(discard_ratio):.2f})."
        if view in ("grad_rollout", "intent"):
            what = "gradient-weighted rollout" if view == "grad_rollout" else "what the decision depends on"
            return f" for *{label}* ({prob:.1%}): {what}."
        if view == "cls":
            return f": what the class token reads in layer {layer}, {head_name}."
        return f": attention each patch receives in layer {layer}, {head_name}."

    # ---- Explore tab -------------------------------------------------------------------------------------
    @user_errors
    def explain(self, image, view="rollout", layer=-1, head="mean", discard_ratio=config.ROLLOUT_DISCARD_RATIO,
                target="", colormap="jet", opacity=0.5, session=None):
        """Analyse the image: heatmap overlay, top-k predictions, intent diagnosis, caption, all heads."""
        session = self.session_for(image, session)
        session.patch = None
        overlay, caption, grid = self.render(
            session, "attends_to", view, layer, head, discard_ratio, target, colormap, opacity
        )
        return overlay, self.label_value(session), self.diagnosis_text(session), caption, grid, session

    @user_errors
    def on_image(self, image, view, layer, head, discard_ratio, target, colormap, opacity, session):
        """The image input changed: analyse the new one, or clear everything when it was removed."""
        if image is None:
            return None, None, "", "", None, None
        return self.explain(image, view, layer, head, discard_ratio, target, colormap, opacity, session)

    @user_errors
    def change_target(self, session, direction, view, layer, head, discard_ratio, target, colormap, opacity):
        """A new target class: show a view that depends on it (gradient-weighted unless intent is on)."""
        if not isinstance(session, Session):
            return (gr.skip(),) * 4
        if view not in ("grad_rollout", "intent"):
            view = "grad_rollout"
        session.patch = None
        rendered = self.render(
            session, direction, view, layer, head, discard_ratio, target, colormap, opacity, skip_same_grid=True
        )
        return (view, *rendered)

    @user_errors
    def rerender(self, session, direction, view, layer, head, discard_ratio, target, colormap, opacity):
        if not isinstance(session, Session):
            return gr.skip(), gr.skip(), gr.skip()
        return self.render(
            session, direction, view, layer, head, discard_ratio, target, colormap, opacity, skip_same_grid=True
        )

    @user_errors
    def change_view(self, session, direction, view, layer, head, discard_ratio, target, colormap, opacity):
        """A new view, or the clear button, replaces the patch inspection."""
        if not isinstance(session, Session):
            return gr.skip(), gr.skip(), gr.skip()
        session.patch = None
        return self.render(
            session, direction, view, layer, head, discard_ratio, target, colormap, opacity, skip_same_grid=True
        )

    def inspect_at(self, session, x_display, y_display, view_args, skip_same_grid=False):
        patch = session.geometry.pixel_to_patch(x_display, y_display)
        session.patch = patch
        if patch is None:
            note = "That point is outside what the model sees (the white box); showing the map instead."
            gr.Warning("That point is outside the part of the image the model sees.")
            overlay, caption, grid = self.render(session, *view_args, note=note, skip_same_grid=skip_same_grid)
            box = session.geometry.view_box()
            overlay = visualization.draw_box(overlay, box, color="white", width=2)
            return overlay, caption, grid
        return self.render(session, *view_args, skip_same_grid=skip_same_grid)

    @user_errors
    def inspect_patch(self, image, x=None, y=None, direction="attends_to", view="rollout", layer=-1, head="mean",
                      discard_ratio=config.ROLLOUT_DISCARD_RATIO, target="", colormap="jet", opacity=0.5,
                      session=None):
        """The patch at (x, y), in the image's own pixels (default: the centre): its attention map, outlined,
        with its row/column named. A point the model does not see gives a message and the map."""
        session = self.session_for(image, session)
        ow, oh = session.analysis.loaded.original_size
        x = ow / 2 if x is None else float(x)
        y = oh / 2 if y is None else float(y)
        xd, yd = session.original_to_display(x, y)
        view_args = (direction, view, layer, head, discard_ratio, target, colormap, opacity)
        return (*self.inspect_at(session, xd, yd, view_args), session)

    @user_errors
    def click(self, session, direction, view, layer, head, discard_ratio, target, colormap, opacity,
              evt: gr.SelectData):
        """A click on the overlay: evt.index is (x, y) in the served (display) image's pixels."""
        if not isinstance(session, Session):
            raise gr.Error("Upload an image first.")
        xd, yd = (float(v) for v in evt.index[:2])
        view_args = (direction, view, layer, head, discard_ratio, target, colormap, opacity)
        overlay, caption, grid = self.inspect_at(session, xd, yd, view_args, skip_same_grid=True)
        x, y = session.display_to_original(xd, yd)
        return overlay, caption, grid, round(x), round(y)

    @user_errors
    def pick_target(self, session, direction, view, layer, head, discard_ratio, colormap, opacity,
                    evt: gr.SelectData):
        """A click on one of the top-k: make it the target class and show the gradient-weighted view."""
        if not isinstance(session, Session):
            return (gr.skip(),) * 5
        index = session.label_index.get(evt.value)
        if index is None:
            index = self.bundle.find_label(evt.value)
        if view not in ("grad_rollout", "intent"):
            view = "grad_rollout"
        session.patch = None
        overlay, caption, grid = self.render(
            session, direction, view, layer, head, discard_ratio, str(index), colormap, opacity, skip_same_grid=True
        )
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
    @user_errors
    def zoom(self, image, policy="adaptive", session=None):
        """Crop where the model looks and classify again: box, crop, before/after predictions, reason."""
        session = self.session_for(image, session)
        with self.model_lock:
            result = zoom_lib.zoom(session.analysis, policy=policy)
        x0, y0, x1, y1 = result.box  # in the image's own pixels
        box = (*session.original_to_display(x0, y0), *session.original_to_display(x1, y1))
        boxed = visualization.draw_box(session.display, box, color=(255, 40, 40), width=3)
        crop = result.crop.copy()
        crop.thumbnail((CROP_SIDE, CROP_SIDE), Image.Resampling.BILINEAR)
        verdict = "**Zoomed in**" if result.zoomed else "**Kept the whole image**"
        source = getattr(result, "source", None)
        info = (
            f"{verdict}: {result.reason}. Box ({x0:.0f}, {y0:.0f}) – ({x1:.0f}, {y1:.0f}) in image pixels"
            + (f", from the {source.replace('_', ' ')} map." if source else ".")
        )
        return (
            boxed, crop, self.label_value(session, result.probs_before), self.label_value(session, result.probs_after),
            info, session,
        )

    @user_errors
    def toggle_zoom(self, enabled, image, policy, session):
        if not enabled:
            return (gr.update(visible=False), None, None, None, None, "", session)
        if image is None:
            raise gr.Error("Upload an image on the Explore tab first.")
        outputs = self.zoom(image, policy, session)
        return (gr.update(visible=True), *outputs)

    @user_errors
    def prune(self, image, keep=config.PRUNE_KEEP * 100, after_block=None, mode=config.PRUNE_MODE, session=None):
        """Drop tokens after a block: kept tokens on the image, predictions before/after, tokens, MACs, ms."""
        session = self.session_for(image, session)
        keep = float(keep)
        if not 10 <= keep <= 100:
            raise gr.Error(f"Retention must be between 10 and 100 percent, got {keep:g}.")
        after_block = self.prune_after_default if after_block in (None, "") else int(after_block)
        with self.model_lock:
            result = pruning.prune(session.analysis, keep / 100, after_block, mode, timing_repeats=TIMING_REPEATS)
        session.prune_key = (session.key, keep, after_block, mode)
        kept = visualization.token_mask_overlay(session.display, session.geometry, result.kept_mask)
        kept = visualization.draw_box(kept, session.geometry.view_box(), color="white", width=2)  # what it sees
        verdict = "decision **kept**" if result.decision_kept else "decision **changed**"
        stats = (
            f"Keep **{keep:.0f}%** of the patch tokens after block {result.after_block} ({result.mode} mode): "
            f"{verdict}.\n\n"
            f"| | before | after |\n|---|---|---|\n"
            f"| tokens | {result.tokens_before} | {result.tokens_after} |\n"
            f"| MACs | {result.macs_before / 1e9:.3f} G | {result.macs_after / 1e9:.3f} G "
            f"({result.macs_after / result.macs_before:.0%}) |\n"
            f"| measured | {result.latency_before_ms:.1f} ms | {result.latency_after_ms:.1f} ms "
            f"({result.latency_after_ms / result.latency_before_ms:.0%}) |"
        )
        before = self.label_value(session, result.probs_before)
        after = self.label_value(session, result.probs_after)
        return kept, before, after, stats, session

    @user_errors
    def prune_if_stale(self, image, keep, after_block, mode, session):
        """Opening the tab: run prune once for the current image and settings, not again."""
        if image is None:
            return (gr.skip(),) * 5
        if isinstance(session, Session) and session.prune_key == (session.key, float(keep), int(after_block), mode):
            return (gr.skip(),) * 5
        return self.prune(image, keep, after_block, mode, session)

    # ---- a new image -------------------------------------------------------------------------------------
    def reset(self, image):
        """Before a new analysis: predicted-class target, no zoom, clear outputs of the old image."""
        return ("", False, gr.update(visible=False), None, None, None, "")


# ----------------------------------------------------------------------------------------------------------
# Layout and wiring
# ----------------------------------------------------------------------------------------------------------


def _examples():
    return [[str(p)] for p in sorted(EXAMPLES_DIR.glob("*.jpg"))]


def build_demo(bundle: vit_analyzer.ViTBundle) -> gr.Blocks:
    ex = Explorer(bundle)
    layers = [(f"{i} (last)" if i == ex.num_layers - 1 else str(i), i) for i in range(ex.num_layers)]
    heads = [("mean over heads", "mean"), ("max over heads", "max"), ("min over heads", "min")]
    heads += [(f"head {h}", str(h)) for h in range(ex.num_heads)]
    gh, gw = vit_analyzer.geometry_for(bundle, (bundle.input_size[1], bundle.input_size[0])).grid
    all_targets = [("predicted class", "")]
    all_targets += [(f"{bundle.label(i)} [{i}]", str(i)) for i in range(len(bundle.id2label))]

    with gr.Blocks(title="ZoomViT Explorer", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        session = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=_release)
        gr.Markdown(
            f"## ZoomViT Explorer\n"
            f"See where **{Path(bundle.name).name}** looks ({ex.num_layers} layers × {ex.num_heads} heads, "
            f"{gh}×{gw} patches of {bundle.patch_size} px), click any patch, zoom in on it and prune what it ignores."
        )
        with gr.Tabs():
            with gr.Tab("Explore", id="explore"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=280):
                        image = hand_over_the_file(gr.Image(
                            label="Image", type="filepath", sources=["upload", "clipboard"], image_mode=None,
                            height=300, elem_id="image",
                        ))
                        if _examples():  # assets/ ships with the repository, not with a wheel
                            gr.Examples(
                                _examples(), inputs=[image], label="Examples (drawn by assets/make_examples.py)",
                                cache_examples=False, examples_per_page=12,
                            )
                        label = gr.Label(
                            num_top_classes=config.TOP_K, label="Prediction (click one to explain it)",
                            elem_id="prediction",
                        )
                        diagnosis = gr.Markdown(elem_id="diagnosis", label="Intent diagnosis")
                    with gr.Column(scale=3, min_width=360):
                        overlay = gr.Image(
                            label="Where it looks (click a patch)", type="pil", format="jpeg", interactive=False,
                            elem_id="overlay", buttons=["download", "fullscreen"],
                        )
                        legend = gr.HTML(legend_html("jet"), elem_id="legend")
                        caption = gr.Markdown(elem_id="caption", label="Caption")
                        with gr.Row():
                            view = gr.Radio(VIEWS, value="rollout", label="View", scale=3, elem_id="view")
                            direction = gr.Radio(
                                DIRECTIONS, value="attends_to", label="Clicked patch shows", scale=2,
                                elem_id="direction",
                            )
                        with gr.Row():
                            layer = gr.Dropdown(
                                layers, value=ex.num_layers - 1, label="Layer", info="CLS / attention / patch",
                                elem_id="layer",
                            )
                            head = gr.Dropdown(
                                heads, value="mean", label="Head", info="rollout: mean / max / min", elem_id="head",
                            )
                            target = text_in_the_api(gr.Dropdown(
                                all_targets, value="", label="Target class",
                                info="gradient-weighted / intent; type to search", filterable=True,
                                allow_custom_value=True, elem_id="target",
                            ), "class index or label text; empty: the predicted class")
                        with gr.Row():
                            discard = gr.Slider(
                                0.0, 0.95, value=config.ROLLOUT_DISCARD_RATIO, step=0.05, label="Discard ratio",
                                info="rollout only", elem_id="discard",
                            )
                            opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Opacity", elem_id="opacity")
                            colormap = gr.Dropdown(COLORMAPS, value="jet", label="Colormap", elem_id="colormap")
                        with gr.Row():
                            clear = gr.Button("Clear patch selection", size="sm")
                        with gr.Accordion("Inspect a patch by its pixel coordinates", open=False):
                            with gr.Row():
                                x_in = gr.Number(label="x (image pixels)", value=None, precision=0, elem_id="x")
                                y_in = gr.Number(label="y (image pixels)", value=None, precision=0, elem_id="y")
                                inspect_btn = gr.Button("Inspect", elem_id="inspect")
                        with gr.Accordion("All heads of this layer: CLS attention, or the clicked patch's", open=True):
                            heads_img = gr.Image(
                                label="All heads", show_label=False, type="pil", format="jpeg", interactive=False,
                                elem_id="heads",
                            )

            with gr.Tab("Zoom & prune", id="zoomprune") as zp_tab:
                gr.Markdown("Works on the image from the **Explore** tab.")
                with gr.Row():
                    zoom_on = gr.Checkbox(False, label="Zoom in on where the model looks", elem_id="zoom_on")
                    policy = gr.Radio(POLICIES, value="adaptive", label="Zoom policy", elem_id="policy")
                    zoom_btn = gr.Button("Zoom", visible=False)  # the /zoom API endpoint (the UI uses the toggle)
                with gr.Group(visible=False) as zoom_group:
                    with gr.Row():
                        zoom_box = gr.Image(
                            label="Zoom box", type="pil", format="jpeg", interactive=False, height=320,
                            elem_id="zoom_box",
                        )
                        zoom_crop = gr.Image(
                            label="Crop", type="pil", format="jpeg", interactive=False, height=320, elem_id="zoom_crop",
                        )
                    zoom_info = gr.Markdown(label="Zoom decision", elem_id="zoom_info")
                    with gr.Row():
                        zoom_before = gr.Label(num_top_classes=3, label="Before (whole image)")
                        zoom_after = gr.Label(num_top_classes=3, label="After zoom")
                gr.Markdown("### Token pruning")
                with gr.Row():
                    keep = gr.Slider(
                        10, 100, value=round(config.PRUNE_KEEP * 100), step=5,
                        label="Retention (% of patch tokens kept)", elem_id="keep",
                    )
                    after_block = gr.Dropdown(
                        list(range(1, ex.num_layers + 1)), value=ex.prune_after_default, label="Prune after block",
                        elem_id="after_block",
                    )
                    mode = gr.Radio(MODES, value=config.PRUNE_MODE, label="Mode", elem_id="mode")
                with gr.Row():
                    kept_img = gr.Image(
                        label="Kept tokens (dropped ones greyed out)", type="pil", format="jpeg", interactive=False,
                        elem_id="kept",
                    )
                    with gr.Column():
                        with gr.Row():
                            prune_before = gr.Label(num_top_classes=3, label="Before", elem_id="prune_before")
                            prune_after = gr.Label(num_top_classes=3, label="After pruning", elem_id="prune_after")
                        prune_stats = gr.Markdown(elem_id="prune_stats", label="Pruning cost")

        # ---- wiring ----------------------------------------------------------------------------------------
        view_controls = [direction, view, layer, head, discard, target, colormap, opacity]
        view_outputs = [overlay, caption, heads_img]
        explain_inputs = [image, view, layer, head, discard, target, colormap, opacity, session]
        explain_outputs = [overlay, label, diagnosis, caption, heads_img, session]
        quiet = dict(show_progress="hidden", api_visibility="private", trigger_mode="always_last")

        # A new image: reset image-specific controls and outputs, then analyse (the /explain endpoint).
        image.change(
            ex.reset, [image],
            [target, zoom_on, zoom_group, kept_img, prune_before, prune_after, prune_stats],
            queue=False, api_visibility="private", show_progress="hidden",
        ).then(
            ex.on_image, explain_inputs, explain_outputs, api_visibility="private",
        ).then(ex.target_choices, [session], [target], api_visibility="private", show_progress="hidden")
        # The same analysis as a plain endpoint: image first, every option with a default.
        gr.Button(visible=False).click(ex.explain, explain_inputs, explain_outputs, api_name="explain")

        view.input(ex.change_view, [session, *view_controls], view_outputs, **quiet)
        for control in (direction, layer, head, colormap):
            control.input(ex.rerender, [session, *view_controls], view_outputs, **quiet)
        target.input(ex.change_target, [session, *view_controls], [view, *view_outputs], api_visibility="private",
                     trigger_mode="always_last")
        for slider in (discard, opacity):
            slider.input(ex.rerender, [session, *view_controls], view_outputs, **quiet)
        colormap.input(
            legend_html, [colormap], [legend], queue=False, api_visibility="private", show_progress="hidden"
        )
        clear.click(ex.change_view, [session, *view_controls], view_outputs, **quiet)
        overlay.select(
            ex.click, [session, *view_controls], [*view_outputs, x_in, y_in], show_progress="hidden",
            api_visibility="private", trigger_mode="always_last",
        )
        inspect_btn.click(
            ex.inspect_patch, [image, x_in, y_in, *view_controls, session], [*view_outputs, session],
            api_name="inspect_patch",
        )
        label.select(
            ex.pick_target, [session, direction, view, layer, head, discard, colormap, opacity],
            [target, view, *view_outputs], show_progress="hidden", api_visibility="private",
        )

        zoom_outputs = [zoom_box, zoom_crop, zoom_before, zoom_after, zoom_info, session]
        zoom_btn.click(ex.zoom, [image, policy, session], zoom_outputs, api_name="zoom")
        for trigger in (zoom_on.input, policy.input):
            trigger(ex.toggle_zoom, [zoom_on, image, policy, session], [zoom_group, *zoom_outputs],
                    api_visibility="private", trigger_mode="always_last")

        prune_inputs = [image, keep, after_block, mode, session]
        prune_outputs = [kept_img, prune_before, prune_after, prune_stats, session]
        keep.release(ex.prune, prune_inputs, prune_outputs, api_name="prune", trigger_mode="always_last")
        for trigger in (after_block.input, mode.input):
            trigger(ex.prune, prune_inputs, prune_outputs, api_visibility="private", trigger_mode="always_last")
        zp_tab.select(ex.prune_if_stale, prune_inputs, prune_outputs, api_visibility="private")

    demo.queue(default_concurrency_limit=4, max_size=64)
    return demo


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def launch_options(host: str = "127.0.0.1", port: int = 7860) -> dict:
    """How the app is served: local only, no share link, capped uploads, bounded session memory."""
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
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="app.py", description="ZoomViT Explorer web app.")
    parser.add_argument(
        "--model", default=None,
        help=f"hub id or local model folder (default: ${config.MODEL_ENV_VAR}, else {config.DEFAULT_MODEL})",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        bundle = vit_analyzer.load_model(args.model)  # resolves --model, $ZOOMVIT_MODEL, the default
    except vit_analyzer.ModelLoadError as exc:
        print(f"zoomvit: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    one_blas_thread()
    demo = build_demo(bundle)
    print(f"ZoomViT Explorer: {bundle.name} on http://{args.host}:{args.port}", file=sys.stderr)
    demo.launch(**launch_options(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
