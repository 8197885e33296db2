"""The web app's model, chosen per browser session: the header that names it, the chooser, the controls that
depend on it, and the switch.

The choice lives in the session's gr.State (`sessions.ModelChoice`, then the Session analysed with it), so one
user's choice never changes another's page; the models themselves are the server's `ModelRegistry` (a few in
memory, least recently used out first). A switch loads the model in the model queue, with a progress message on
the header; then the header, the About text and the model's controls follow, and the image on screen, if any, is
analysed again with the new model (the same chain as a new upload). A model that fails to load is a warning
toast with its one-line error, and the session keeps its model.
"""

import concurrent.futures
import functools
import inspect
from types import SimpleNamespace

import gradio as gr

from zoomvit import model_cards
from zoomvit.app.about import about_text
from zoomvit.app.feedback import message_of
from zoomvit.app.sessions import SESSION_STATES, ModelChoice, SessionStore, chosen_model, prune_after_default
from zoomvit.geometry import geometry_for
from zoomvit.models import ViTBundle

CONTROLS = ("block", "head", "target", "after_block")  # the controls whose choices depend on the model


def header_text(bundle: ViTBundle) -> str:
    """What the model is and where it runs."""
    last = bundle.num_layers
    gh, gw = geometry_for(bundle, (bundle.input_size[1], bundle.input_size[0])).grid
    return (
        f"## ZoomViT Explorer\n"
        f"See where **{model_cards.display_name(bundle.name)}** looks ({last} blocks × {bundle.num_heads} heads, "
        f"{gh}×{gw} patches of {bundle.patch_size} px), click any patch, zoom in on it and prune what it ignores.\n\n"
        f"<small>Model family: {bundle.adapter.describe()}. Running on {bundle.device} in {bundle.dtype_name}."
        "</small>"
    )


def model_controls(bundle: ViTBundle) -> dict[str, dict]:
    """Control name (CONTROLS) -> the gr.Dropdown arguments that depend on the model: the page is built with
    them for the default model, and a switch sends them for the new one."""
    last = bundle.num_layers
    heads = [("mean over heads", "mean"), ("max over heads", "max"), ("min over heads", "min")]
    heads += [(f"head {h}", str(h)) for h in range(1, bundle.num_heads + 1)]  # numbered from 1, as blocks are
    targets = [("predicted class", "")] + [(f"{bundle.label(i)} [{i}]", str(i)) for i in range(len(bundle.id2label))]
    return {
        "block": dict(
            choices=[(f"{b} (last)" if b == last else str(b), b) for b in range(1, last + 1)],
            value=last,
            info=f"1 to {last}: CLS, attention, clicked patch",
        ),
        "head": dict(choices=heads, value="mean"),
        "target": dict(choices=targets, value=""),
        "after_block": dict(
            choices=list(range(1, last)),
            value=prune_after_default(last),
            info=f"blocks after it (up to {last}) see only the kept tokens",
        ),
    }


def model_header(store: SessionStore) -> SimpleNamespace:
    """The header (elem_id "header"), the model chooser (elem_id "model"; shown when there is a choice) and the
    About text, for the default model."""
    bundle, registry = store.bundle, store.registry
    c = SimpleNamespace()
    with gr.Row(equal_height=False):
        c.header = gr.Markdown(header_text(bundle), elem_id="header")
        c.model = gr.Dropdown(
            registry.choices(),
            value=registry.offer(None).name,
            label="Model",
            elem_id="model",
            scale=0,
            min_width=260,
            visible=len(registry.choices()) > 1,
            info=f"for this browser tab; {registry.max_models} kept in memory at most",
        )
    with gr.Accordion("About: what the maps, the diagnosis, zoom and pruning mean", open=False, elem_id="about"):
        c.about = gr.Markdown(about_text(bundle), elem_id="about_text")
    c.switched = gr.State(False)  # whether the last choice loaded (the switch's chain goes on only then)
    return c


class ModelSwitch:
    """The chooser's handlers: load the chosen model, then show it; or, if it failed, show the current one."""

    def __init__(self, store: SessionStore):
        self.store = store

    def load(self, name, session, progress=gr.Progress()):
        """Load the chosen model (in the model queue): (the session's new state, the chooser, whether it
        loaded). A model that fails to load is a warning toast, and the chooser goes back to the session's."""
        registry = self.store.registry
        try:
            label = registry.label(name)  # a model not offered is refused here
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                loading, loaded = pool.submit(registry.get, name), False
                while not loaded:  # said again while it loads: the page's queue status can hide the first one
                    progress(0, desc=f"Loading {label}…")
                    loaded = self._done(loading)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            gr.Warning(message_of(exc, "load_model"), title="Could not load that model")
            return gr.skip(), registry.offer(chosen_model(session)).name, False
        return ModelChoice(registry.offer(name).name), gr.skip(), True

    @staticmethod
    def _done(job, wait_s: float = 0.5) -> bool:
        """Whether job finished within wait_s (its error, if any, raised)."""
        try:
            job.result(timeout=wait_s)
        except concurrent.futures.TimeoutError:
            return False
        return True

    @staticmethod
    def go_on(switched):
        """Ends the switch's chain after a load that failed: a hidden error (the toast said why) on an event
        without outputs, so no view shows an error badge."""
        if not switched:
            raise gr.Error("The model did not load.", visible=False, print_exception=False)

    def show(self, session):
        """The header, the About text and the model's controls, for the session's model."""
        bundle = self.store.bundle_for(session)
        controls = model_controls(bundle)
        return (header_text(bundle), about_text(bundle), *(gr.update(**controls[name]) for name in CONTROLS))


def wire(store: SessionStore, ui: SimpleNamespace, model_run: dict, analyse_anew):
    """The chooser's events: load (model queue, progress on the header), then show the model and analyse the
    image again (`analyse_anew(trigger)` chains the new-image events on `trigger`); after a failure, nothing
    more. Components by name in `ui`: model, switched, session, header, about and the CONTROLS."""
    switch = ModelSwitch(store)
    private = dict(api_visibility="private")
    loaded = ui.model.input(
        switch.load,
        [ui.model, ui.session],
        [ui.session, ui.model, ui.switched],
        show_progress_on=[ui.header],
        **model_run,
        **private,
    )
    shown = loaded.then(switch.go_on, [ui.switched], None, queue=False, **private).success(
        switch.show,
        [ui.session],
        [ui.header, ui.about, *(getattr(ui, n) for n in CONTROLS)],
        show_progress="hidden",
        **private,
    )
    analyse_anew(shown.then)


def pin_models(demo: gr.Blocks, session_state: gr.State, store: SessionStore):
    """Every event that reads the session's state keeps that session's model in memory until the event ends
    (ModelRegistry.pinned): a switch in another tab can never take it away mid-event. Call it once every event is
    wired."""
    for block_fn in demo.fns.values():
        fn = block_fn.fn
        if (
            fn is not None
            and any(c is session_state for c in block_fn.inputs)
            and not inspect.isgeneratorfunction(fn)
            and not inspect.iscoroutinefunction(fn)
        ):
            block_fn.fn = _pinning(fn, store.registry)


def _pinning(fn, registry):
    """fn, run with the model of the session state among its arguments pinned (none there: the default)."""

    @functools.wraps(fn)  # the same signature: Gradio reads fn's parameters (gr.SelectData, gr.Progress) from it
    def pinned(*args, **kwargs):
        state = next((a for a in (*args, *kwargs.values()) if isinstance(a, SESSION_STATES)), None)
        with registry.pinned(chosen_model(state)):
            return fn(*args, **kwargs)

    return pinned
