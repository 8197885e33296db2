"""ZoomViT Explorer, the web app: see where a Vision Transformer looks, click a patch, zoom in, prune tokens.

    python app.py [--model HUB_ID_OR_FOLDER ...] [--max-models N] [--host 127.0.0.1] [--port 7860]

Each browser session chooses its model among those offered (`model_chooser`, `model_registry`).

UI only: every number comes from the library (vit_analyzer, zoom, pruning, intent, visualization). This module
puts the panels of `layout` on tabs and wires them; the handlers live in `explorer` (with `sessions`, `views`,
`zoom_prune` and `exports`), the serving concerns (port, uploads, temp folder) in `serving`.

Speed: the model runs on an upload, a target-class change, zoom, prune and the faithfulness panel, one event at a
time (a queue with one worker for them: one model, bounded memory). Each session keeps its `Analysis` in a gr.State
(Gradio stores the object as is, without copying it); every other control re-renders from it, on a copy of the
image at most DISPLAY_SIDE pixels wide (benchmarks/bench_views.py measures this path).

Conventions, the same in the app, the API, the CLI and the reports: blocks are numbered 1..L and heads 1..H (-1:
the last of either); `keep` is the share of patch tokens kept, a fraction in (0, 1].

API: /explain, /inspect_patch, /zoom, /prune and /compare take the image first and plain values after it, each with a
default. A call with an image the session has already analysed reuses that analysis. Only files that came
through this server's upload route are opened.

Errors: an API call gets the message as its error. In the browser a failure is a warning toast and every view
keeps its last good state (a raised error would paint each output with a red badge); a new file that cannot
be analysed clears the previous image's results and says why.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
# numpy's OpenBLAS on one thread: see `serving.one_blas_thread` (this covers `python app.py`, where numpy is not
# imported yet; main() also switches an already loaded OpenBLAS, as under `zoomvit serve`).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from dataclasses import fields  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from zoomvit import devices, models  # noqa: E402
from zoomvit.app import (  # noqa: E402
    compare_tab,
    layout,
    model_chooser,  # noqa: E402
)
from zoomvit.app.explorer import Explorer, checked_settings, reset_outputs, target_back, target_choices  # noqa: E402
from zoomvit.app.faithfulness_panel import wire_panel  # noqa: E402
from zoomvit.app.feedback import answer_refusals, keeps_view, user_errors, view_inputs_checked_by_us  # noqa: E402
from zoomvit.app.model_registry import ModelRegistry, resolve_max_models  # noqa: E402
from zoomvit.app.serving import (  # noqa: E402
    JANITOR,
    TEMP_MAX_AGE_S,
    OwnStreamPerCall,
    SweepAfterUploads,
    add_serve_options,
    one_blas_thread,
    port_free,
)
from zoomvit.app.sessions import MAX_SESSIONS, SESSION_TTL_S, release_session  # noqa: E402
from zoomvit.app.views import PAGE_CSS, PAGE_JS, ViewSettings, legend_html  # noqa: E402
from zoomvit.checks import check_port  # noqa: E402
from zoomvit.errors import ZoomViTError  # noqa: E402

MAX_UPLOAD = "25mb"  # Gradio refuses larger uploads; images.load_image also bounds the decoded pixels
MODEL_QUEUE = "model"  # the concurrency id of every event that may run the model (one at a time)
VIEW_FIELDS = tuple(f.name for f in fields(ViewSettings))  # the view controls, by the names the handlers use


# ----------------------------------------------------------------------------------------------------------
# Wiring
# ----------------------------------------------------------------------------------------------------------

PRIVATE = dict(api_visibility="private")
QUIET = dict(show_progress="hidden", trigger_mode="always_last", **PRIVATE)
MODEL_RUN = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=1)  # one model, and a queue


def view_event(handler, before: list, ui: SimpleNamespace, after: list = (), without=()):
    """(fn, inputs) for an event whose handler takes the view controls as one ViewSettings: the one place that
    builds it.

    Gradio passes each input component's value as a positional argument of its own. `inputs` are `before`, the
    view controls (all ViewSettings fields but `without`, in field order), then `after`; `fn` packs the
    controls' values into a ViewSettings where the handler has its `settings` parameter. fn's signature is the
    handler's with `settings` spelled out as those fields (with the defaults of the handler's default settings,
    if it has one): Gradio names the API's parameters after it, and finds the handler's gr.SelectData parameter
    in it (Gradio passes that after the inputs)."""
    names = [name for name in VIEW_FIELDS if name not in without]
    parameters = list(inspect.signature(handler).parameters.values())
    at = [p.name for p in parameters].index("settings")
    if at != len(before):
        raise TypeError(f"{handler.__name__} takes its settings after {at} values, not {len(before)}")
    defaults = parameters[at].default  # a ViewSettings where the handler has one (the API), else none
    spelled = [
        inspect.Parameter(
            name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=getattr(defaults, name, inspect.Parameter.empty)
        )
        for name in names
    ]

    @functools.wraps(handler)
    def fn(*args):
        settings = checked_settings(ViewSettings(**dict(zip(names, args[at : at + len(names)]))))  # any JSON
        return handler(*args[:at], settings, *args[at + len(names) :])

    fn.__signature__ = inspect.Signature([*parameters[:at], *spelled, *parameters[at + 1 :]])
    fn.__annotations__ = {k: v for k, v in handler.__annotations__.items() if k != "settings"}
    return fn, [*before, *(getattr(ui, name) for name in names), *after]


def _endpoints(ex: Explorer, ui: SimpleNamespace) -> dict:
    """The API, name -> (handler, inputs, outputs): image first, every option with a default. The browser
    events reuse the inputs and outputs."""
    view_inputs_checked_by_us(ui, ex.store.num_layers, ex.store.num_heads)
    explain, explain_inputs = view_event(ex.explore.explain, [ui.image], ui, [ui.session], without=["direction"])
    inspect_patch, inspect_inputs = view_event(ex.explore.inspect_patch, [ui.image, ui.x_in, ui.y_in], ui, [ui.session])
    return {
        "explain": (
            explain,
            explain_inputs,
            [ui.overlay, ui.label, ui.diagnosis, ui.caption, ui.heads_img, ui.session],
        ),
        "inspect_patch": (
            inspect_patch,
            inspect_inputs,
            [ui.overlay, ui.caption, ui.heads_img, ui.x_in, ui.y_in, ui.session],
        ),
        "zoom": (
            ex.zoom_prune.zoom,
            [ui.image, ui.policy, ui.session],
            [ui.zoom_box, ui.zoom_crop, ui.zoom_before, ui.zoom_after, ui.zoom_info, ui.session],
        ),
        "prune": (
            ex.zoom_prune.prune,
            [ui.image, ui.keep, ui.after_block, ui.mode, ui.fusion, ui.session],
            [ui.kept_img, ui.prune_before, ui.prune_after, ui.prune_stats, ui.session],
        ),
        "compare": compare_tab.endpoint(ex, ui, view_event),
    }


def _wire_explore(ex: Explorer, ui: SimpleNamespace, api: dict):
    """The Explore tab's browser events."""
    handlers = ex.explore
    view_outputs = [ui.overlay, ui.caption, ui.heads_img]
    slider_outputs = [*view_outputs, ui.discard_ratio, ui.opacity]

    # A new image, or the same one with the model a session switched to: clear everything of the old one, analyse.
    on_image, explain_inputs = view_event(handlers.on_image, [ui.image], ui, [ui.session], without=["direction"])
    ui.analyse_anew = lambda trigger: (
        trigger(
            reset_outputs,
            None,
            [
                ui.target,
                ui.zoom_on,
                ui.zoom_group,
                ui.kept_img,
                ui.prune_before,
                ui.prune_after,
                ui.prune_stats,
                ui.x_in,
                ui.y_in,
                ui.overlay,
                ui.label,
                ui.diagnosis,
                ui.caption,
                ui.heads_img,
                ui.export_files,
                ui.zp_export_files,
            ],
            queue=False,
            show_progress="hidden",
            **PRIVATE,
        )
        .then(
            on_image,
            explain_inputs,
            api["explain"][2],
            **MODEL_RUN,
            **PRIVATE,
        )
        .then(target_choices, [ui.session], [ui.target], show_progress="hidden", **PRIVATE)
    )
    ui.analyse_anew(ui.image.change)

    change_view, view_inputs = view_event(handlers.change_view, [ui.session], ui)
    rerender = keeps_view(5)(view_event(handlers.rerender, [ui.session], ui)[0])  # one function: one queue slot
    ui.view.input(keeps_view(5)(change_view), view_inputs, slider_outputs, **QUIET)
    # Sliders on .change: a slider's reset button (↺) fires neither .input nor .release.
    for trigger in (
        ui.direction.input,
        ui.block.input,
        ui.head.input,
        ui.colormap.input,
        ui.discard_ratio.change,
        ui.opacity.change,
    ):
        trigger(rerender, view_inputs, slider_outputs, **QUIET)
    change_target, _ = view_event(handlers.change_target, [ui.session], ui)
    ui.target.input(
        keeps_view(5, fallback=target_back)(change_target),
        view_inputs,
        [ui.target, ui.view, *view_outputs],
        trigger_mode="always_last",
        **MODEL_RUN,
        **PRIVATE,
    )
    ui.colormap.input(legend_html, [ui.colormap], [ui.legend], queue=False, show_progress="hidden", **PRIVATE)
    ui.clear.click(keeps_view(5)(change_view), view_inputs, slider_outputs, **QUIET)
    click, _ = view_event(handlers.click, [ui.session], ui)
    ui.overlay.select(
        keeps_view(5)(click),
        view_inputs,
        [*view_outputs, ui.x_in, ui.y_in],
        show_progress="hidden",
        trigger_mode="always_last",
        **PRIVATE,
    )
    inspect_patch, inspect_inputs, inspect_outputs = api["inspect_patch"]
    ui.inspect_btn.click(keeps_view(6)(inspect_patch), inspect_inputs, inspect_outputs, **MODEL_RUN, **PRIVATE)
    pick_target, pick_inputs = view_event(handlers.pick_target, [ui.session], ui, without=["target"])
    ui.label.select(
        keeps_view(5)(pick_target),
        pick_inputs,
        [ui.target, ui.view, *view_outputs],
        show_progress="hidden",
        **MODEL_RUN,
        **PRIVATE,
    )
    ui.export_btn.click(keeps_view(1)(ex.exports.export_explore), [ui.session], [ui.export_files], **PRIVATE)


def _wire_zoom_prune(ex: Explorer, ui: SimpleNamespace, api: dict):
    """The Zoom & prune tab's browser events."""
    handlers = ex.zoom_prune
    for trigger in (ui.zoom_on.input, ui.policy.input):
        trigger(
            keeps_view(8, fallback=handlers.zoom_off)(handlers.toggle_zoom),
            [ui.zoom_on, ui.image, ui.policy, ui.session],
            [ui.zoom_on, ui.zoom_group, *api["zoom"][2]],
            trigger_mode="always_last",
            **MODEL_RUN,
            **PRIVATE,
        )

    # keep on .change: a drag, the arrow keys, a typed value and the reset button (↺, which fires neither .input
    # nor .release) all end up here; prune_ui skips a run for what is already shown (the slider set to a clamp).
    _, prune_inputs, prune_outputs = api["prune"]
    ui.mode.input(handlers.fusion_control, [ui.mode], [ui.fusion], queue=False, show_progress="hidden", **PRIVATE)
    for trigger in (ui.keep.change, ui.after_block.input, ui.mode.input, ui.fusion.input):
        trigger(
            keeps_view(6)(handlers.prune_ui),
            prune_inputs,
            [ui.keep, *prune_outputs],
            trigger_mode="always_last",
            **MODEL_RUN,
            **PRIVATE,
        )
    ui.zp_tab.select(
        keeps_view(6)(handlers.prune_if_stale), prune_inputs, [ui.keep, *prune_outputs], **MODEL_RUN, **PRIVATE
    )
    ui.zp_export_btn.click(
        keeps_view(1)(ex.exports.export_zoom_prune), [ui.session, ui.zoom_on], [ui.zp_export_files], **PRIVATE
    )


def _wire(ex: Explorer, ui: SimpleNamespace):
    """Every event; `ui` holds the components by name (the view controls by their ViewSettings field)."""
    api = _endpoints(ex, ui)
    # The API first (events are named after their function: these take the plain names); errors are errors.
    for name, (fn, inputs, outputs) in api.items():
        gr.Button(visible=False).click(user_errors(fn), inputs, outputs, api_name=name, **MODEL_RUN)
    _wire_explore(ex, ui, api)
    _wire_zoom_prune(ex, ui, api)
    model_chooser.wire(ex.store, ui, MODEL_RUN, ui.analyse_anew)
    compare_tab.wire(ex, ui, view_event, MODEL_RUN)
    measure, measure_inputs = view_event(ex.measure_faithfulness, [ui.image], ui, [ui.session])
    wire_panel(ex.faithfulness, ui, MODEL_RUN, QUIET, measure, measure_inputs)


def build_demo(models_: models.ViTBundle | ModelRegistry) -> gr.Blocks:
    """The app on one model, or on the models a registry offers (each browser session chooses; the first is the
    default)."""
    ex = Explorer(models_)
    bundle = ex.store.bundle  # the default model lays the page out
    with gr.Blocks(title="ZoomViT Explorer", analytics_enabled=False, delete_cache=(3600, TEMP_MAX_AGE_S)) as demo:
        session = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=release_session)
        head = model_chooser.model_header(ex.store)
        with gr.Tabs():
            with gr.Tab("Explore", id="explore"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=280):
                        left = layout.image_column()
                    with gr.Column(scale=3, min_width=360):
                        right = layout.view_column(bundle)
            with gr.Tab("Compare", id="compare") as cmp_tab:
                compared = compare_tab.layout()
            with gr.Tab("Zoom & prune", id="zoomprune") as zp_tab:
                gr.Markdown("Works on the image from the **Explore** tab.")
                zoom = layout.zoom_panel()
                prune = layout.prune_panel(ex)
        _wire(
            ex,
            SimpleNamespace(
                session=session,
                zp_tab=zp_tab,
                **vars(head),
                **vars(left),
                **vars(right),
                **vars(zoom),
                **vars(prune),
                cmp_tab=cmp_tab,
                **vars(compared),
            ),
        )

    model_chooser.pin_models(demo, session, ex.store)  # after every event is wired
    del bundle  # the registry alone holds the models: one it lets go of leaves memory
    JANITOR.protectors.append(lambda: set().union(*(getattr(b, "keep_in_cache", set()) for b in demo.blocks.values())))
    JANITOR.start()
    # api_open=False: the direct /run routes would skip the one-at-a-time model queue.
    demo.queue(default_concurrency_limit=4, max_size=64, api_open=False)
    answer_refusals(demo)  # a message and one log line for each refused request
    return demo


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def launch_options(host: str = "127.0.0.1", port: int = 7860) -> dict:
    """How the app is served: local only, no share link, capped uploads, bounded session memory and temp folder.
    quiet: Gradio's start-up lines would suggest share=True, which this app never offers; main() prints the URL."""
    return dict(
        server_name=host,
        server_port=port,
        share=False,
        quiet=True,
        max_file_size=MAX_UPLOAD,
        state_session_capacity=MAX_SESSIONS,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        show_error=False,
        footer_links=["api"],
        theme=gr.themes.Default(primary_hue="orange", secondary_hue="blue"),
        css=PAGE_CSS + compare_tab.CSS,
        js=PAGE_JS,
        app_kwargs={"middleware": [Middleware(SweepAfterUploads), Middleware(OwnStreamPerCall)]},
    )


def build_parser() -> argparse.ArgumentParser:
    """The same options as `zoomvit serve` (serving.add_serve_options)."""
    return add_serve_options(argparse.ArgumentParser(prog="app.py", description="ZoomViT Explorer web app."))


def main(argv=None) -> int:
    return serve(build_parser().parse_args(argv))


def serve(args) -> int:
    """Serve the app with parsed options (`python app.py` and `zoomvit serve` alike)."""
    try:  # a bad device, dtype, port number or --max-models fails at once, before the slow model load
        devices.resolve_dtype(args.dtype, devices.resolve_device(args.device))
        check_port(args.port)
        resolve_max_models(args.max_models)
    except ZoomViTError as exc:
        print(f"zoomvit: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not port_free(args.host, args.port):
        print(f"zoomvit: error: port {args.port} on {args.host} is in use; pick another with --port.", file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes of the server
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:  # every --model checked (config.json), then the first (the default) loaded
        registry = ModelRegistry(args.model, args.device, args.dtype, args.max_models)
        registry.get()
    except ZoomViTError as exc:
        print(f"zoomvit: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    one_blas_thread()
    demo = build_demo(registry)
    print(f"ZoomViT Explorer: {registry.default} on http://{args.host}:{args.port}", file=sys.stderr)
    demo.launch(**launch_options(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
