"""The Explore tab's faithfulness panel: the deletion and insertion curves of the map on screen, for this image
and the class the map explains, so a user sees whether this map explains this prediction.

The eval's protocol (`faithfulness.perturbation_curves`, 10 steps): 20 perturbed images in two batched forwards
(benchmarks/bench_faithfulness_panel.py times it). It runs on request (a button: a view change stays a pure
redraw), and its result is kept per session for each (map, target class): a view that comes back shows its result
again without a model run.
"""

import hashlib
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from types import SimpleNamespace

import gradio as gr
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from zoomvit import faithfulness
from zoomvit.app.feedback import keeps_view
from zoomvit.app.sessions import Session, SessionStore
from zoomvit.app.views import VIEW_NAMES
from zoomvit.errors import ZoomViTError

KEPT = 32  # results kept per session (a few hundred bytes each), oldest dropped first
QUOTED_STEP = 2  # the text quotes the probabilities after this many steps (20% of the pixels)
PERTURBED = 2 + 2 * (faithfulness.STEPS - 1)  # images per map: the inner steps of both curves, and both ends
BUTTON = "Faithfulness of this map"
HINT = (
    f"Press **{BUTTON}** to measure whether the map on screen explains the prediction: its deletion and "
    f"insertion curves on this image ({PERTURBED} perturbed images through the model)."
)


@dataclass(frozen=True)
class MapFaithfulness:
    """The deletion and insertion curves of one map for one target class (probabilities of that class at 0, 10,
    ..., 100% of the pixels removed or restored, most important first)."""

    view: str  # the map, as the caption names it
    target: int
    label: str
    prob: float  # the target's probability on the untouched image
    deletion: np.ndarray
    insertion: np.ndarray
    seconds: float

    @property
    def deletion_auc(self) -> float:
        return faithfulness.auc(self.deletion)

    @property
    def insertion_auc(self) -> float:
        return faithfulness.auc(self.insertion)


def curves_plot(result: MapFaithfulness) -> Image.Image:
    """Both curves on one small plot, their AUCs in the legend."""
    fig = Figure(figsize=(5.6, 2.8), dpi=100)  # bare Figure: no pyplot state in a server
    fig.subplots_adjust(left=0.11, right=0.98, top=0.96, bottom=0.17)  # fixed margins: constrained layout costs 2x
    ax = fig.subplots()
    x = np.linspace(0, 100, len(result.deletion))
    ax.plot(
        x,
        result.deletion,
        marker="o",
        color="tab:red",
        label=f"deletion: AUC {result.deletion_auc:.3f} (lower is better)",
    )
    ax.plot(
        x,
        result.insertion,
        marker="o",
        color="tab:blue",
        label=f"insertion: AUC {result.insertion_auc:.3f} (higher is better)",
    )
    ax.set_xlabel("% of pixels removed / restored, most important first", fontsize=8)
    ax.set_ylabel(f"p({result.label[:24]})", fontsize=8)
    ax.set_ylim(0, max(1e-3, float(max(result.deletion.max(), result.insertion.max()))) * 1.08)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # the pixels straight from the canvas: no PNG round trip
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def panel_text(result: MapFaithfulness) -> str:
    share = 100 * QUOTED_STEP // faithfulness.STEPS
    label = f"*{result.label}*"
    return (
        f"**{result.view}** for {label} ({result.prob:.1%}): deletion AUC **{result.deletion_auc:.3f}** (lower is "
        f"better), insertion AUC **{result.insertion_auc:.3f}** (higher is better).\n\n"
        f"Removing the {share}% of the pixels this map ranks highest takes {label} from {result.prob:.1%} to "
        f"{result.deletion[QUOTED_STEP]:.1%}; those {share}% alone, over a blurred copy, give it "
        f"{result.insertion[QUOTED_STEP]:.1%}. A map that explains the prediction makes the first curve fall fast and "
        f"the second rise fast.\n\n"
        f"<small>The eval's protocol: {faithfulness.STEPS} steps of {100 // faithfulness.STEPS}% of the pixels, "
        f"removed (set to the dataset mean) or restored over a blurred copy; {PERTURBED} perturbed images in "
        f"{result.seconds:.2f} s.</small>"
    )


class FaithfulnessPanel:
    """Measures the map on screen (`measure`) and keeps each session's results, per (map, target class)."""

    def __init__(self, store: SessionStore):
        self.store = store
        self._results = weakref.WeakKeyDictionary()  # Session -> OrderedDict(key -> MapFaithfulness)
        self._painted = weakref.WeakKeyDictionary()  # Session -> the result (or None: the hint) the panel shows
        self._lock = threading.Lock()

    @staticmethod
    def _on_screen(session: Session):
        """(key, target, the map's name, grid map) of the map on screen; the key is the model, the map's content
        and the target: a slider that leaves the map as it is (opacity, colormap) finds the same result."""
        shown = session.shown
        target = shown.settings["target"]["index"] if "target" in shown.settings else session.analysis.predicted
        grid_map = np.ascontiguousarray(shown.grid_map, dtype=np.float32)
        digest = hashlib.blake2b(grid_map.tobytes(), digest_size=16).hexdigest()
        key = (session.analysis.bundle.name, int(target), grid_map.shape, digest)
        view = shown.settings.get("view")
        name = (
            f"The attention of patch row {shown.patch[0]}, column {shown.patch[1]}"
            if shown.patch is not None
            else VIEW_NAMES.get(view, str(view))
        )
        return key, int(target), name, grid_map

    def cached(self, session) -> MapFaithfulness | None:
        if not isinstance(session, Session) or session.shown is None:
            return None
        key = self._on_screen(session)[0]
        with self._lock:
            return self._results.get(session, {}).get(key)

    def measure(self, session) -> MapFaithfulness:
        """The faithfulness of the map on screen: kept, or measured now (20 perturbed images, batched)."""
        if not isinstance(session, Session) or session.shown is None:
            raise ZoomViTError("Upload an image first.")
        key, target, name, grid_map = self._on_screen(session)
        found = self.cached(session)
        if found is not None:
            return found
        source = self.store.for_target(session, target)  # the view's own analysis: already there
        with self.store.model_lock:
            start = time.perf_counter()
            deletion, insertion = faithfulness.perturbation_curves(source, grid_map)
            seconds = time.perf_counter() - start
        probs = session.analysis.probs
        result = MapFaithfulness(
            name,
            target,
            source.bundle.label(target),
            float(probs[target]),
            np.asarray(deletion),
            np.asarray(insertion),
            seconds,
        )
        with self._lock:
            kept = self._results.setdefault(session, OrderedDict())
            kept[key] = result
            while len(kept) > KEPT:
                kept.popitem(last=False)
        return result

    def compute(self, session):
        """The button: (plot, text) of the map on screen. A view changed meanwhile is not painted over with the
        old view's result (that one is kept, for when the view comes back)."""
        result = self.measure(session)
        if self.cached(session) is not result:  # the view changed while it ran
            return self.refresh(session)
        return self._paint(session, result)

    def refresh(self, session):
        """The overlay changed: the new map's result if it was measured, else the hint (no model run). What the
        panel already shows is not drawn again (an opacity or colormap change keeps the map)."""
        if not isinstance(session, Session) or session.shown is None:
            return None, ""
        result = self.cached(session)
        with self._lock:
            if session in self._painted and self._painted[session] is result:
                return gr.skip(), gr.skip()
        return self._paint(session, result)

    def _paint(self, session, result):
        with self._lock:
            self._painted[session] = result
        return (None, HINT) if result is None else (curves_plot(result), panel_text(result))


def build_panel() -> SimpleNamespace:
    """The panel's components (in the Explore tab's right column)."""
    c = SimpleNamespace()
    with gr.Accordion("Faithfulness: does this map explain this prediction?", open=True, elem_id="faithfulness"):
        c.faith_btn = gr.Button(BUTTON, size="sm", elem_id="faith_btn")
        c.faith_plot = gr.Image(
            label="Deletion and insertion curves",
            show_label=False,
            type="pil",
            format="png",
            interactive=False,
            elem_id="faith_plot",
            height=280,
            buttons=["download"],
        )
        c.faith_text = gr.Markdown(elem_id="faith_text")
    return c


def wire_panel(panel: FaithfulnessPanel, ui, model_run: dict, quiet: dict, measure, measure_inputs: list):
    """The button runs `measure` (in the model queue: (plot, text, session)); a new overlay shows its map's kept
    result or the hint."""
    outputs = [ui.faith_plot, ui.faith_text]
    ui.faith_btn.click(
        keeps_view(3)(measure), measure_inputs, [*outputs, ui.session], api_visibility="private", **model_run
    )
    ui.overlay.change(panel.refresh, [ui.session], outputs, **quiet)
