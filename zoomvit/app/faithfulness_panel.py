"""The Explore tab's faithfulness panel: the deletion and insertion curves of the map on screen, for this image
and the class the map explains, so a user sees whether this map explains this prediction.

The eval's protocol (`faithfulness.perturbation_curves_many`, 10 steps), beside a random map's curves as the eval
shows them (drawn from RANDOM_SEED: the same baseline every time): 38 perturbed images in three batched forwards
(benchmarks/bench_faithfulness_panel.py times it). It runs on request (a button: a view change stays a pure
redraw), and its result is kept per session for each (map, target class): a view that comes back shows its result
again without a model run. AUCs are shown x 100 ("points"), as eval's report.md and the README show them.
"""

import hashlib
import textwrap
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
RANDOM_SEED = 0  # the random map's pixel order: the same baseline for an image every time
# Both ends are shared; each map (this one and the random one) adds the inner steps of both curves.
PERTURBED = 2 + 2 * 2 * (faithfulness.STEPS - 1)
BUTTON = "Faithfulness of this map"
HINT = (
    f"**{BUTTON}** measures whether the map on screen explains the prediction: its deletion and insertion curves "
    f"on this image, beside a random map's ({PERTURBED} perturbed images through the model)."
)
LABEL_WIDTH = 28  # characters a line of the plot's y-axis label holds (a longer class name wraps)
LEGEND_ROOM = 1.4  # the y axis reaches this far above the highest point: the legend sits above the curves
MARGIN_PX = 4  # the least room left between the y-axis label and the figure's edge
HIDDEN = (gr.update(value=None, visible=False), gr.update(value="", visible=False))  # no result: no empty boxes


def points(auc: float) -> float:
    """An AUC as the app, eval's report.md and the README show it: x 100."""
    return 100 * auc


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
    random_deletion: np.ndarray  # the same curves of a random map (RANDOM_SEED): the baseline to beat
    random_insertion: np.ndarray
    seconds: float

    @property
    def deletion_auc(self) -> float:
        return faithfulness.auc(self.deletion)

    @property
    def insertion_auc(self) -> float:
        return faithfulness.auc(self.insertion)

    @property
    def random_deletion_auc(self) -> float:
        return faithfulness.auc(self.random_deletion)

    @property
    def random_insertion_auc(self) -> float:
        return faithfulness.auc(self.random_insertion)


def curves_figure(result: MapFaithfulness) -> Figure:
    """Both curves and the random map's on one small plot (probabilities in %), AUCs x 100 in the legend; laid out
    so that the y-axis label and its ticks are inside the figure."""
    fig = Figure(figsize=(5.6, 2.8), dpi=100)  # bare Figure: no pyplot state in a server
    fig.subplots_adjust(left=0.11, right=0.98, top=0.96, bottom=0.17)  # fixed margins: constrained layout costs 2x
    ax = fig.subplots()
    x = np.linspace(0, 100, len(result.deletion))
    curves = (
        (result.deletion, result.random_deletion, "tab:red", "deletion", "lower"),
        (result.insertion, result.random_insertion, "tab:blue", "insertion", "higher"),
    )
    for curve, random_curve, colour, kind, better in curves:
        auc, random_auc = points(faithfulness.auc(curve)), points(faithfulness.auc(random_curve))
        ax.plot(x, 100 * curve, marker="o", color=colour, label=f"{kind}: AUC {auc:.1f} ({better} is better)")
        ax.plot(
            x, 100 * random_curve, linestyle="--", color=colour, alpha=0.5, label=f"random map: AUC {random_auc:.1f}"
        )
    ax.set_xlabel("% of pixels removed / restored, most important first", fontsize=8)
    name = result.label.split(",")[0]  # an ImageNet label lists synonyms: the first names the class
    ax.set_ylabel(textwrap.fill(f"p({name}) in %", LABEL_WIDTH, break_on_hyphens=False), fontsize=8)
    top = max(
        result.deletion.max(), result.insertion.max(), result.random_deletion.max(), result.random_insertion.max()
    )
    ax.set_ylim(0, 100 * max(1e-3, float(top)) * LEGEND_ROOM)
    ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= min(100, ax.get_ylim()[1])])  # none past 100%
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2, loc="upper center")
    _fit_left_margin(fig, ax)
    return fig


def _fit_left_margin(fig: Figure, ax) -> None:
    """Widen the left margin as far as the y-axis label and its tick labels need: a class of small probability has
    long tick labels (0.05, 0.10, ...) that pushed the label off the figure. Text extents need no drawing."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    overflow = MARGIN_PX - ax.yaxis.get_tightbbox(renderer).x0
    if overflow > 0:
        fig.subplots_adjust(left=fig.subplotpars.left + overflow / fig.bbox.width)


def curves_plot(result: MapFaithfulness) -> Image.Image:
    canvas = FigureCanvasAgg(curves_figure(result))
    canvas.draw()  # the pixels straight from the canvas: no PNG round trip
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def panel_text(result: MapFaithfulness) -> str:
    share = 100 * QUOTED_STEP // faithfulness.STEPS
    label = f"*{result.label}*"
    return (
        f"**{result.view}** for {label} ({result.prob:.1%}): deletion AUC **{points(result.deletion_auc):.1f}** vs "
        f"random {points(result.random_deletion_auc):.1f} (lower is better), insertion AUC "
        f"**{points(result.insertion_auc):.1f}** vs random {points(result.random_insertion_auc):.1f} (higher is "
        f"better).\n\n"
        f"Removing the {share}% of the pixels this map ranks highest takes {label} from {result.prob:.1%} to "
        f"{result.deletion[QUOTED_STEP]:.1%} (a random {share}%: {result.random_deletion[QUOTED_STEP]:.1%}); those "
        f"{share}% alone, over a blurred copy, give it {result.insertion[QUOTED_STEP]:.1%} (random: "
        f"{result.random_insertion[QUOTED_STEP]:.1%}). A map that explains the prediction makes the first curve fall "
        f"fast and the second rise fast, both faster than a random map's.\n\n"
        f"<small>The eval's protocol: {faithfulness.STEPS} steps of {100 // faithfulness.STEPS}% of the pixels, "
        f"removed (set to the dataset mean) or restored over a blurred copy; AUCs x 100 (the area under the "
        f"probability in %), as in eval's report.md; the random map's pixel order drawn from seed {RANDOM_SEED}; "
        f"{PERTURBED} perturbed images in {result.seconds:.2f} s.</small>"
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
        """The faithfulness of the map on screen beside a random map's: kept, or measured now (PERTURBED images,
        batched)."""
        if not isinstance(session, Session) or session.shown is None:
            raise ZoomViTError("Upload an image first.")
        key, target, name, grid_map = self._on_screen(session)
        found = self.cached(session)
        if found is not None:
            return found
        source = self.store.for_target(session, target)  # the view's own analysis: already there
        with self.store.model_lock:
            start = time.perf_counter()
            # The random baseline of the same image and class in the same batched forwards.
            curves = faithfulness.perturbation_curves_many(source, {"map": grid_map, "random": None}, seed=RANDOM_SEED)
            seconds = time.perf_counter() - start
        probs = session.analysis.probs
        result = MapFaithfulness(
            name,
            target,
            source.bundle.label(target),
            float(probs[target]),
            *(np.asarray(curve) for curve in (*curves["map"], *curves["random"])),
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
        """The overlay changed: the new map's result if it was measured, else nothing (no model run). What the
        panel already shows is not drawn again (an opacity or colormap change keeps the map)."""
        if not isinstance(session, Session) or session.shown is None:
            return HIDDEN
        result = self.cached(session)
        with self._lock:
            if session in self._painted and self._painted[session] is result:
                return gr.skip(), gr.skip()
        return self._paint(session, result)

    def _paint(self, session, result):
        with self._lock:
            self._painted[session] = result
        if result is None:
            return HIDDEN
        return gr.update(value=curves_plot(result), visible=True), gr.update(value=panel_text(result), visible=True)


def build_panel() -> SimpleNamespace:
    """The panel's components (in the Explore tab's right column)."""
    c = SimpleNamespace()
    with gr.Accordion("Faithfulness: does this map explain this prediction?", open=True, elem_id="faithfulness"):
        gr.Markdown(HINT, elem_id="faith_hint")
        c.faith_btn = gr.Button(BUTTON, size="sm", elem_id="faith_btn")
        # Shown with a result only: empty boxes took room before anything was asked.
        c.faith_plot = gr.Image(
            label="Deletion and insertion curves",
            show_label=False,
            type="pil",
            format="png",
            interactive=False,
            elem_id="faith_plot",
            height=280,
            buttons=["download"],
            visible=False,
        )
        c.faith_text = gr.Markdown(elem_id="faith_text", visible=False)
    return c


def wire_panel(panel: FaithfulnessPanel, ui, model_run: dict, quiet: dict, measure, measure_inputs: list):
    """The button runs `measure` (in the model queue: (plot, text, session)); a new overlay shows its map's kept
    result, or no plot and no text."""
    outputs = [ui.faith_plot, ui.faith_text]
    ui.faith_btn.click(
        keeps_view(3)(measure), measure_inputs, [*outputs, ui.session], api_visibility="private", **model_run
    )
    ui.overlay.change(panel.refresh, [ui.session], outputs, **quiet)
