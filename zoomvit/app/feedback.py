"""How the app answers the user: failures as messages (an API error, or a warning toast that keeps the view),
typed numbers checked, and typed slider values brought into range instead of refused."""

import functools
import logging
import re

import gradio as gr

from zoomvit import config
from zoomvit.checks import finite_number  # noqa: F401 - the handlers' check of a typed number, by its old name here
from zoomvit.errors import ZoomViTError

log = logging.getLogger("zoomvit.app")


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
            raise gr.Error(message_of(exc, fn.__name__), print_exception=False) from None

    return wrapper


def _one_line(text) -> str:
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def answer_refusals(blocks: gr.Blocks) -> gr.Blocks:
    """Every refused request gets a one-line message, and the server log one line for it (not a traceback).

    Gradio prints a traceback for every gr.Error, a user's mistake as much as a fault, and answers `{"error": null}`
    to inputs its own checks refuse before any component of ours sees them: a server path sent with Gradio's file
    marker (the same path without it gets `serving.NOT_UPLOADED` from our upload guard: so does this one), a file
    input that is not a file object, too few values, a value a component cannot read. Unexpected errors in the
    handlers keep their traceback (`message_of` logs it)."""
    from gradio.exceptions import ComponentProcessingError, InvalidPathError
    from pydantic import ValidationError

    from zoomvit.app.serving import NOT_A_FILE, NOT_UPLOADED

    stock_preprocess, stock_process = blocks.preprocess_data, blocks.process_api

    async def preprocess_data(block_fn, inputs, *args, **kwargs):
        expected = getattr(block_fn, "inputs", [])
        if isinstance(inputs, list) and len(inputs) < len(expected):
            sent = len([b for b in expected if not b.skip_api])
            raise gr.Error(f"This call takes {sent} values, in the order view_api lists them; got {len(inputs)}.")
        try:
            return await stock_preprocess(block_fn, inputs, *args, **kwargs)
        except InvalidPathError:  # inputs only here: a path that did not come through this server's upload
            raise gr.Error(NOT_UPLOADED) from None
        except ValidationError:  # a file input's data model: not a file object at all
            raise gr.Error(NOT_A_FILE) from None
        except ComponentProcessingError as exc:
            at = re.search(r"at index (\d+)", str(exc))
            block = expected[int(at[1])] if at and int(at[1]) < len(expected) else None
            what = getattr(block, "label", None) or "An input"
            raise gr.Error(_one_line(f"{what} could not be read: {exc.__cause__}")[:300]) from None

    async def process_api(block_fn, *args, **kwargs):
        try:
            return await stock_process(block_fn, *args, **kwargs)
        except gr.Error as exc:
            name = getattr(block_fn, "api_name", None) or getattr(block_fn, "name", block_fn)
            log.warning("refused %s: %s", name, _one_line(exc.message))
            raise gr.Error(
                exc.message, duration=exc.duration, visible=exc.visible, title=exc.title, print_exception=False
            ) from None

    blocks.preprocess_data, blocks.process_api = preprocess_data, process_api
    return blocks


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


def clamped(value, low: float, high: float, name: str) -> tuple[float, bool]:
    """A typed slider value brought into [low, high] (with a warning); True when it had to change."""
    number = finite_number(value, name)
    if number is None:
        raise ZoomViTError(f"{name} is empty: give a number from {low:g} to {high:g}.")
    inside = min(max(number, low), high)
    if inside != number:
        gr.Warning(f"{name} must be from {low:g} to {high:g}; using {inside:g}.", title="Out of range")
    return inside, inside != number


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


CHECKED_BY_US = set()  # elem_ids of the inputs whose handlers check any value Gradio's own preprocessing refuses
_stock_preprocess = {}


def checked_by_us(component, api_info: dict | None = None):
    """Hand a value that Gradio's own preprocessing refuses (a block number as text, a head as a number, NaN for x)
    to the handler as it was sent: the handler's check (checks.py) takes every form the API lists and says in one
    line what is wrong with the rest. Gradio's refusals name no parameter ("Value: 3 is not in the list of
    choices"), or for a number fail without any message. Values Gradio takes are passed as it makes them.

    api_info: how the API lists the value (view_api), to match what the check takes. Patched on the class, keyed
    by elem_id, for the reason `clamped_by_us` gives."""
    kind = type(component)
    if kind not in _stock_preprocess:
        stock = _stock_preprocess[kind] = kind.preprocess

        def preprocess(self, payload):
            try:
                return stock(self, payload)
            except Exception:
                if self.elem_id in CHECKED_BY_US:
                    return payload
                raise

        kind.preprocess = preprocess
    CHECKED_BY_US.add(component.elem_id)
    if api_info is not None:
        component.api_info = lambda: api_info
    return component


def view_inputs_checked_by_us(ui, num_layers: int, num_heads: int):
    """The API's view inputs take what their checks take (checks.layer_index, head_index; the handlers' number and
    choice checks), and view_api lists them so: block and head both as numbers from 1 (-1: the last; digits as text
    too), the head also as mean, max or min. Gradio listed the block as text and refused text, and the head the
    other way round. The counts are the default model's; a session's chosen model has its own."""
    checked_by_us(
        ui.block, {"type": "integer", "additional_description": f"block number 1..{num_layers}; -1: the last"}
    )
    checked_by_us(
        ui.head,
        {
            "anyOf": [{"type": "integer"}, {"type": "string", "enum": list(config.HEAD_FUSIONS)}],
            "additional_description": f"head number 1..{num_heads}; -1: the last; or mean, max or min over the heads",
        },
    )
    for component in (ui.colormap, ui.x_in, ui.y_in, ui.view, ui.direction):
        checked_by_us(component)
    for component in (ui.after_block, ui.mode, ui.fusion, ui.policy):  # the Zoom & prune endpoints' choices
        checked_by_us(component)
