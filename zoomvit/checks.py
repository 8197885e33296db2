"""One check for each rule a user's number must follow: block numbers, where pruning cuts, kept shares, ports.

The library, the app, its API and the CLI all call these, each naming the value as its user knows it
("--after-block", "Prune after block"), so a rule is written once and says the same thing everywhere.
Imports nothing heavy: the CLI checks its options with these before torch loads.
"""

from __future__ import annotations

import math

from zoomvit import config
from zoomvit.errors import ZoomViTError


def _number(value) -> float:
    if isinstance(value, bool):  # True is not block 1
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _index_of_number(value, count: int) -> int | None:
    """The 0-based index of item number `value` of `count` (numbered 1..count; -1: the last), None if it is none."""
    number = _number(value)
    if number == -1:
        return count - 1
    return int(number) - 1 if number.is_integer() and 1 <= number <= count else None


def layer_index(block, num_layers: int, name: str = "Block") -> int:
    """The library's 0-based layer index of block number `block` (blocks are numbered 1..L; -1: the last), as the
    app, its API and the CLI take it."""
    index = _index_of_number(block, num_layers)
    if index is None:
        raise ZoomViTError(f"{name} must be in 1..{num_layers} (or -1 for the last), got {block}.")
    return index


def head_index(head, num_heads: int, name: str = "Head"):
    """One head by its number (heads are numbered 1..H, as blocks are; -1: the last) as the library's 0-based
    index, or a fusion over all heads ('mean', 'max', 'min') as it is, as the app, its API and the CLI take it."""
    fusion = head.strip().lower() if isinstance(head, str) else None
    if fusion in config.HEAD_FUSIONS:
        return fusion
    index = _index_of_number(head, num_heads)
    if index is None:
        raise ZoomViTError(f"{name} must be in 1..{num_heads} (or -1 for the last), or mean, max or min; got {head}.")
    return index


def finite_number(value, name: str) -> float | None:
    """A number as an API caller may send it (JSON number, or text of one); None when it is empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        if isinstance(value, bool):  # JSON true is not 1
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ZoomViTError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise ZoomViTError(f"{name} must be a finite number, got {value!r}.")
    return number


def check_number(value, name: str) -> float:
    """A number that must be given (its range is checked where it is used)."""
    number = finite_number(value, name)
    if number is None:
        raise ZoomViTError(f"{name} is empty: give a number.")
    return number


def check_choice(value, choices, name: str):
    """One of `choices` (a control's values, as the API takes them)."""
    if isinstance(value, str) and value in choices:
        return value
    raise ZoomViTError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}.")


def check_after_block(after_block, num_layers: int, name: str = "Prune after block", last_allowed=False) -> int:
    """Where pruning can happen: after block 1..L-1 (blocks are numbered 1..L; after the last one there is nothing
    left to prune). The engine itself can cut after the last block too (`last_allowed`): merging there is exact for
    heads that average the patches."""
    last = num_layers if last_allowed else num_layers - 1
    number = _number(after_block)
    if not (math.isfinite(number) and number.is_integer() and 1 <= number <= last):
        why = "" if last_allowed else f" (after the last block, {num_layers}, nothing is left to prune)"
        raise ZoomViTError(f"{name} must be in 1..{last}{why}, got {after_block}.")
    return int(number)


def check_keep(keep, name: str = "keep", low: float | None = None) -> float:
    """A share of patch tokens to keep: a fraction in (0, 1], or in [low, 1] where a control offers no less."""
    number = _number(keep)
    if not (0.0 < number <= 1.0 and (low is None or number >= low)):
        shown = f"{keep:g}" if isinstance(keep, (int, float)) else repr(keep)
        allowed = "(0, 1]" if low is None else f"[{low:g}, 1]"
        raise ZoomViTError(f"{name} must be a fraction in {allowed}, got {shown}.")
    return number


def check_port(port, name: str = "--port") -> int:
    """A TCP port a server can listen on: 1..65535. 0 ("any free port") is refused too: Gradio will not take it,
    and a user could not tell which port to open."""
    number = _number(port)
    if not (math.isfinite(number) and number.is_integer() and 1 <= number <= 65535):
        raise ZoomViTError(f"{name} must be a port number in 1..65535, got {port}.")
    return int(number)


def check_max_models(value, name: str = "--max-models") -> int:
    """How many models the web app may hold in memory at once: a whole number, 1 or more."""
    number = _number(value.strip() if isinstance(value, str) else value)
    if not (math.isfinite(number) and number.is_integer() and number >= 1):
        raise ZoomViTError(f"{name} must be a whole number of models, 1 or more, got {value}.")
    return int(number)
