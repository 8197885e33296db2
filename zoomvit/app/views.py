"""What the view controls say (`ViewSettings`), and turning them into what the app shows: the overlay, its
caption, the all-heads grid, the top-k label and the diagnosis line. Drawn from a session's cached analysis:
no model run unless the target class is new (benchmarks/bench_views.py measures this path)."""

from dataclasses import dataclass

import gradio as gr
import numpy as np

from zoomvit import artifacts, compare, config, visualization
from zoomvit.app.feedback import finite_number
from zoomvit.app.sessions import Session, SessionStore, Shown
from zoomvit.errors import ZoomViTError
from zoomvit.geometry import small_image_note
from zoomvit.vit_analyzer import Prediction, top_predictions

HEADS_SHEET_WIDTH = 720  # the all-heads grid fills the Explore tab's right column (about 720 px on a 1280-px page)

VIEWS = [
    ("Rollout", "rollout"),
    ("Gradient-weighted", "grad_rollout"),
    ("Intent", "intent"),
    ("CLS attention", "cls"),
    ("Attention", "attention"),
]
VIEW_NAMES = dict((value, label) for label, value in VIEWS)
# The view controls each view's map reads (config.MAP_READS), besides colormap and opacity (every view draws with
# those); "patch" is a clicked patch's attention. The export records these only; the Compare tab keys its kept strips
# on them.
READS = {**config.MAP_READS, "patch": ("direction", "block", "head")}
TARGET_VIEWS = tuple(view for view, reads in READS.items() if "target" in reads)  # grad_rollout, intent
COLORMAPS = ["jet", "turbo", "viridis", "inferno", "magma", "plasma", "hot", "gray"]
DIRECTIONS = [("what it attends to", "attends_to"), ("what attends to it", "attended_by")]


@dataclass(frozen=True)
class ViewSettings:
    """The view controls' values, as the user set them (checked when drawn). The defaults are the controls'
    initial values, and the API's defaults.

    direction: a clicked patch shows what it attends to ("attends_to") or what attends to it ("attended_by");
    block: 1..L, or -1 for the last; head: 1..H (numbered as blocks are; -1 for the last), or mean / max / min
    over heads; target: a class index or label text, empty for the predicted class; opacity: of the heatmap, 0..1.
    """

    direction: str = "attends_to"
    view: str = config.DEFAULT_VIEW
    block: int = -1
    head: str = "mean"
    discard_ratio: float = config.ROLLOUT_DISCARD_RATIO
    target: str = ""
    colormap: str = "jet"
    opacity: float = 0.5


# Every picture fits its column, as the Compare tab's sheets do (Gradio's own sizing): whole, however narrow the
# window or wide the image. The server draws a very wide or tall image with a short side of MIN_PANEL_SIDE pixels
# at least, for its full-screen and download buttons.
PAGE_CSS = """
#overlay img, #overlay canvas { cursor: crosshair; }
.zv-legend { display: flex; align-items: center; gap: .5em; font-size: .85em; margin: 0 .25em; }
.zv-legend .bar { flex: 1; height: 10px; border-radius: 3px; }
"""

# Run once when the page loads (launch(js=...)).
PAGE_JS = """
() => {
  // The target class box selects its text when focused, so typing replaces it and searches the list: Gradio's
  // dropdown keeps the shown label and would append to it. Chrome drops a selection made on focus at the
  // mouseup of the same click, so that one mouseup is cancelled.
  let focused = null;
  document.addEventListener('focusin', (e) => {
    if (e.target.matches && e.target.matches('#target input')) { e.target.select(); focused = e.target; }
  });
  document.addEventListener('mouseup', (e) => {
    if (focused && e.target === focused) e.preventDefault();
    focused = null;
  }, true);
}
"""


def recorded(settings: dict) -> dict:
    """The settings of a view (its "view" key names it) without those its map does not read."""
    reads = READS.get(settings["view"], ())
    return {name: value for name, value in settings.items() if name in ("view", "colormap", "opacity", *reads)}


def legend_html(cmap: str) -> str:
    stops = ", ".join(visualization.colormap_stops(cmap))
    return (
        f'<div class="zv-legend"><span>less important</span>'
        f'<span class="bar" style="background: linear-gradient(to right, {stops})"></span>'
        f"<span>more important</span></div>"
    )


def head_name(head) -> str:
    """A head as the user numbers it (1..H) from the library's index, or a fusion over heads."""
    return f"{head} over heads" if isinstance(head, str) else f"head {head + 1}"


class ViewRenderer:
    """Draws a session's views from its cached analysis, and records what the overlay shows (for the export)."""

    def __init__(self, store: SessionStore):
        self.store = store  # the model is each session's own (session.bundle): none is held here

    def render(self, session: Session, settings: ViewSettings, note: str = "", skip_same_grid: bool = False):
        """(overlay, caption, heads grid) from the cached analysis: no model run unless the target is new.

        The all-heads grid (the Compare tab's sheet, the chosen head framed) depends only on the block, the head,
        the clicked patch, the colours: it is redrawn only when one of those changed, and with skip_same_grid (UI
        events) not even sent again (gr.skip()).
        """
        s = settings
        layer, head = self.store.block_index(s.block, session), self.store.head_index(s.head, session)
        alpha = finite_number(s.opacity, "Opacity")
        if alpha is None or not 0.0 <= alpha <= 1.0:
            raise ZoomViTError(f"Opacity must be from 0 to 1, got {s.opacity!r}.")
        record = {
            "view": s.view,
            "block": layer + 1,
            "head": head if isinstance(head, str) else str(head + 1),
            "discard_ratio": float(s.discard_ratio),
            "colormap": s.colormap,
            "opacity": alpha,
        }
        draw = self._patch_map if session.patch is not None else self._view_map
        grid_map, caption = draw(session, s, layer, head, record)
        record = recorded(record)
        image = visualization.heat_overlay(session.display, session.geometry, grid_map, s.colormap, alpha)
        if session.patch is not None:
            image = visualization.patch_outline(image, session.geometry, *session.patch, color="white", width=3)
        flagged = artifacts.artifact_patches(session.analysis)  # of the image's pass: flagged in every view
        image = artifacts.outline(image, session.geometry, flagged)
        grid_key = (session.patch, s.direction if session.patch else None, layer, head, s.colormap, alpha)
        if grid_key == session.grid_key and session.grid_image is not None:
            grid = gr.skip() if skip_same_grid else session.grid_image
        else:
            grid = compare.heads_grid(
                session.analysis,
                layer,
                session.patch,
                s.direction,
                s.colormap,
                alpha,
                selected=None if isinstance(head, str) else head,
                image=session.display,
                geometry=session.geometry,
                width=HEADS_SHEET_WIDTH,
            ).image
            session.grid_key, session.grid_image = grid_key, grid
        session.shown = Shown(np.asarray(grid_map), caption, s.colormap, alpha, record, session.patch)
        if flagged:
            caption = f"{caption}\n\n{artifacts.note(flagged)}"
        small = small_image_note(session.bundle, session.analysis.loaded.image.size)
        if small:
            caption = f"{caption}\n\n*{small}*"
        if note:
            caption = f"{note}\n\n{caption}"
        return image, caption, grid

    def _patch_map(self, session: Session, s: ViewSettings, layer: int, head, record: dict):
        """The clicked patch's attention row (what it attends to) or column (what attends to it)."""
        analysis = session.analysis
        row, col = session.patch
        attends_to = s.direction != "attended_by"
        pick = analysis.attended_by_patch if attends_to else analysis.attending_patch
        gh, gw = analysis.grid
        caption = (
            f"Patch **row {row}, column {col}** (of {gh}×{gw}): "
            f"{'what it attends to' if attends_to else 'what attends to it'} in block {layer + 1}, "
            f"{head_name(head)}."
        )
        record.update(direction=s.direction, view="patch")
        return pick(row, col, layer, head), caption

    def _view_map(self, session: Session, s: ViewSettings, layer: int, head, record: dict):
        """The chosen view's map: for the target class where the view depends on it."""
        analysis = session.analysis
        if s.view in TARGET_VIEWS:
            target_index = self.store.resolve_target(session, s.target)
            source = self.store.for_target(session, target_index)
            record["target"] = Prediction(
                target_index, session.bundle.label(target_index), float(analysis.probs[target_index])
            ).as_dict()
        else:
            target_index, source = analysis.predicted, analysis
        grid_map = source.map(s.view, layer, head, float(s.discard_ratio))
        caption = f"**{VIEW_NAMES.get(s.view, s.view)}**" + self.view_detail(session, s, layer + 1, head, target_index)
        return grid_map, caption

    def view_detail(self, session: Session, s: ViewSettings, number: int, head, target_index: int) -> str:
        label = session.bundle.label(target_index)
        prob = float(session.analysis.probs[target_index])
        if s.view == "rollout":
            return (
                f": attention rolled out through all {session.num_layers} blocks ({head_name(head)}, "
                f"discard ratio {float(s.discard_ratio):.2f}); where it looks, for any class."
            )
        if s.view in TARGET_VIEWS:
            what = "gradient-weighted rollout" if s.view == "grad_rollout" else "what the decision depends on"
            return f" for *{label}* ({prob:.1%}): {what}."
        if s.view == "cls":
            return f": what the class token reads in block {number}, {head_name(head)}."
        return f": attention each patch receives in block {number}, {head_name(head)}."

    def label_value(self, session: Session, probs=None) -> dict:
        """Top-k as a gr.Label value; a label shown twice (ImageNet has two 'crane's) gets its index."""
        probs = session.analysis.probs if probs is None else probs
        top = top_predictions(session.bundle, probs)
        names = [p.label for p in top]
        value = {}
        for p in top:
            name = p.label if names.count(p.label) == 1 else f"{p.label} [{p.index}]"
            value[name] = p.prob
            if probs is session.analysis.probs:
                session.label_index[name] = p.index
        return value

    @staticmethod
    def diagnosis_text(session: Session) -> str:
        d = session.diagnosis
        if d.guess:  # the kind describes the map of a guess: never shown as a plain "good"
            return f"**Intent: unsure, the prediction itself is a guess** (map: {d.kind}): {d.reason}."
        return f"**Intent: {d.kind}**: {d.reason}."
