"""How the app answers the user: failures as messages (an API error, or a warning toast that keeps the view),
typed numbers checked, and typed slider values brought into range instead of refused."""

import functools
import logging
import math

import gradio as gr

from errors import ZoomViTError

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
