"""The explorer: one shared model, handlers that read and write per-session state. The handlers raise; the
wiring (app.py) wraps them with `feedback.user_errors` (API) or `feedback.keeps_view` (browser).

`Explorer` assembles the parts: the session store (`sessions`), the view renderer (`views`), the Explore tab's
handlers (here), the Zoom & prune tab's (`zoom_prune`) and the exports (`exports`). The handlers take the view
controls as one `views.ViewSettings`.
"""

from dataclasses import replace

import gradio as gr

from zoomvit import config, models, visualization
from zoomvit.app.compare_tab import CompareHandlers
from zoomvit.app.exports import Exports
from zoomvit.app.faithfulness_panel import FaithfulnessPanel
from zoomvit.app.feedback import clamped, finite_number, message_of
from zoomvit.app.model_registry import ModelRegistry
from zoomvit.app.sessions import FailedImage, Session, SessionStore, chosen_model, forget_image
from zoomvit.app.views import COLORMAPS, DIRECTIONS, TARGET_VIEWS, VIEW_NAMES, ViewRenderer, ViewSettings
from zoomvit.app.zoom_prune import ZoomPruneHandlers
from zoomvit.checks import check_choice, check_number
from zoomvit.errors import ZoomViTError

OUTSIDE = "That point is outside what the model sees (the white box); showing the map instead."


def checked_settings(settings: ViewSettings) -> ViewSettings:
    """The view values as an API caller may send them (any JSON), checked for what the drawing cannot check
    itself: a number for the discard ratio, a listed colormap. Ranges are checked where the values are used (the
    browser's sliders bring a typed value into range first); block and head by the session's model."""
    return replace(
        settings,
        view=check_choice(settings.view, list(VIEW_NAMES), "View"),
        direction=check_choice(settings.direction, [value for _, value in DIRECTIONS], "Direction"),
        discard_ratio=check_number(settings.discard_ratio, "Discard ratio"),
        colormap=check_choice(settings.colormap, COLORMAPS, "Colormap"),
    )


def target_back(session, *args, **kwargs):
    """After a target that failed: the dropdown shows the target that is on screen again."""
    text = session.target_text if isinstance(session, Session) else ""
    return (text, gr.skip(), gr.skip(), gr.skip(), gr.skip())


def target_choices(session):
    """Top-k first (with their probabilities), then every label: the dropdown is searchable."""
    if not isinstance(session, Session):
        return gr.skip()
    label, probs = session.bundle.label, session.analysis.probs
    top = [p.index for p in session.analysis.top()]
    rest = [i for i in range(len(probs)) if i not in set(top)]
    choices = [("predicted class", "")]
    choices += [(f"{label(i)} ({probs[i]:.1%})", str(i)) for i in top]
    choices += [(f"{label(i)} [{i}]", str(i)) for i in rest]
    return gr.update(choices=choices, value="")


def reset_outputs():
    """Before a new analysis: predicted-class target, no zoom, and no output of the old image left."""
    return ("", False, gr.update(visible=False), None, None, None, "", None, None, None, None, "", "", None, None, None)


class ExploreHandlers:
    """The Explore tab: analyse an image, redraw on any view control, inspect a patch, pick the target class."""

    def __init__(self, store: SessionStore, views: ViewRenderer):
        self.store, self.views = store, views

    def explain(self, image, settings: ViewSettings = ViewSettings(), session=None):
        """Analyse the image: heatmap overlay, top-k predictions, intent diagnosis, caption, all heads."""
        session = self.store.session_for(image, session)
        session.patch = None
        overlay, caption, grid = self.views.render(session, settings)
        session.target_text = "" if settings.target is None else str(settings.target)
        return overlay, self.views.label_value(session), self.views.diagnosis_text(session), caption, grid, session

    def on_image(self, image, settings: ViewSettings, session):
        """The image input changed: analyse the new one. Nothing of the previous image stays on screen: a file
        that cannot be analysed leaves empty outputs and the reason, and no analysis (a FailedImage).

        Replacing a picture fires the input's .change twice for the same file: the second time a file that
        failed is not tried, nor warned about, again."""
        if image is None:
            return None, None, "", "", None, forget_image(session)  # the session keeps its model
        if isinstance(session, FailedImage) and session.path == str(image):
            return None, None, f"**Could not analyse this file**: {session.message}", "", None, session
        try:
            outputs = self.explain(image, settings, session)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            message = message_of(exc, "on_image")
            gr.Warning(message, title="Could not analyse this file")
            return (
                None,
                None,
                f"**Could not analyse this file**: {message}",
                "",
                None,
                FailedImage(str(image), message, chosen_model(session)),
            )
        outputs[-1].zoom_result = outputs[-1].prune_result = None  # the new image's reset cleared them on screen
        return outputs

    def change_target(self, session, settings: ViewSettings):
        """A new target class: show a view that depends on it (gradient-weighted unless intent is on)."""
        if not isinstance(session, Session):
            raise ZoomViTError("Upload an image first.")
        if settings.view not in TARGET_VIEWS:
            settings = replace(settings, view="grad_rollout")
        session.patch = None
        rendered = self.views.render(session, settings, skip_same_grid=True)
        session.target_text = "" if settings.target is None else str(settings.target)
        return (gr.skip(), settings.view, *rendered)

    def rerender(self, session, settings: ViewSettings, clear_patch=False):
        """Any view control: redraw from the cached analysis. Typed slider values out of range are brought
        into range, and the slider shows the value used."""
        if not isinstance(session, Session):
            return (gr.skip(),) * 5
        discard_ratio, fix_discard = clamped(settings.discard_ratio, 0.0, config.MAX_DISCARD_RATIO, "Discard ratio")
        opacity, fix_opacity = clamped(settings.opacity, 0.0, 1.0, "Opacity")
        if clear_patch:
            session.patch = None
        settings = replace(settings, discard_ratio=discard_ratio, opacity=opacity)
        rendered = self.views.render(session, settings, skip_same_grid=True)
        return (*rendered, discard_ratio if fix_discard else gr.skip(), opacity if fix_opacity else gr.skip())

    def change_view(self, session, settings: ViewSettings):
        """A new view, or the clear button, replaces the patch inspection."""
        return self.rerender(session, settings, clear_patch=True)

    def inspect_at(self, session, x_display, y_display, settings: ViewSettings, note="", skip_same_grid=False):
        patch = None
        if x_display is not None:
            patch = session.geometry.pixel_to_patch(x_display, y_display)
        session.patch = patch
        if patch is None:
            note = (note + " " if note else "") + OUTSIDE
            gr.Warning("That point is outside the part of the image the model sees.")
            overlay, caption, grid = self.views.render(session, settings, note=note, skip_same_grid=skip_same_grid)
            overlay = visualization.draw_box(overlay, session.geometry.view_box(), color="white", width=2)
            return overlay, caption, grid
        return self.views.render(session, settings, note=note, skip_same_grid=skip_same_grid)

    def inspect_patch(self, image, x=None, y=None, settings: ViewSettings = ViewSettings(), session=None):
        """The patch at (x, y), in the image's own pixels: its attention map, outlined, with its row and column
        named. Without x and y: the image centre, and the caption says so. Returns the x, y used."""
        x, y = finite_number(x, "x"), finite_number(y, "y")
        if (x is None) != (y is None):
            raise ZoomViTError("Give both x and y (image pixels), or neither for the image centre.")
        session = self.store.session_for(image, session)
        ow, oh = session.analysis.loaded.original_size
        note = ""
        if x is None:
            x, y = ow / 2, oh / 2  # a true centre: on a 1-pixel image, pixel 0's corner is outside the crop
            note = f"No x, y given: the image centre (x={x:g}, y={y:g})."
        if not (0 <= x < ow and 0 <= y < oh):  # checked here: 1e308 would overflow on the way to a patch
            overlay, caption, grid = self.inspect_at(session, None, None, settings, note)
            return overlay, caption, grid, gr.skip(), gr.skip(), session
        xd, yd = session.original_to_display(x, y)
        overlay, caption, grid = self.inspect_at(session, xd, yd, settings, note)
        return overlay, caption, grid, x, y, session

    def click(self, session, settings: ViewSettings, evt: gr.SelectData):
        """A click on the overlay: evt.index is (x, y) in the served (display) image's pixels."""
        if not isinstance(session, Session):
            raise ZoomViTError("Upload an image first.")
        xd, yd = (float(v) for v in evt.index[:2])
        overlay, caption, grid = self.inspect_at(session, xd, yd, settings, skip_same_grid=True)
        x, y = session.display_to_original(xd, yd)
        return overlay, caption, grid, round(x), round(y)

    def pick_target(self, session, settings: ViewSettings, evt: gr.SelectData):
        """A click on one of the top-k: make it the target class and show the gradient-weighted view."""
        if not isinstance(session, Session):
            return (gr.skip(),) * 5
        index = session.label_index.get(evt.value)
        if index is None:
            index = session.bundle.find_label(evt.value)
        view = settings.view if settings.view in TARGET_VIEWS else "grad_rollout"
        session.patch = None
        settings = replace(settings, view=view, target=str(index))
        overlay, caption, grid = self.views.render(session, settings, skip_same_grid=True)
        session.target_text = str(index)
        return str(index), view, overlay, caption, grid


class Explorer:
    """The app's handlers, on the model each session chose (a ModelRegistry, or one bundle), and the parts they
    share."""

    def __init__(self, models_: "models.ViTBundle | ModelRegistry"):
        self.store = SessionStore(models_)  # per-session analyses; every model run goes through its lock
        self.views = ViewRenderer(self.store)
        self.explore = ExploreHandlers(self.store, self.views)
        self.zoom_prune = ZoomPruneHandlers(self.store, self.views)
        self.exports = Exports(self.store)
        self.compare = CompareHandlers(self.store, self.views, self.explore)  # the Compare tab
        self.faithfulness = FaithfulnessPanel(self.store)  # the Explore tab's deletion / insertion panel

    def measure_faithfulness(self, image, settings: ViewSettings, session):
        """The faithfulness panel's button: (plot, text, session). Right after a model switch the page is still
        analysing its image with the new model (the session holds only its choice): the image is analysed now, and
        the map of the view's settings measured, the map the page is about to show."""
        current = isinstance(session, Session) and session.shown is not None and session.path == str(image)
        if image is not None and not current:
            session = self.explore.explain(image, settings, session)[-1]
        plot, text = self.faithfulness.compute(session)
        return plot, text, session
