"""What a model folder says about itself: the name a person knows it by and its model card.

A folder written by `zoomvit train` holds train_settings.json (its base model and data) and README.md (its
model card): the app names such a model "deit-tiny-patch16-224 fine-tuned on flowers-102", not by its folder (often
just "model" or "out"), and shows its card in the About text. Any other model is named as given: a folder by its
own name, a hub id as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

SETTINGS_FILE = "train_settings.json"  # training.outputs writes it (and reads it back on --resume)
CARD_FILE = "README.md"
MAX_CARD_CHARS = 20_000  # a card longer than this is cut (a README is not meant to be a book in the About panel)
SPLIT_FOLDERS = ("train", "val", "test")  # DATA/train names its data by DATA


def _folder(name: str) -> Path | None:
    try:
        path = Path(str(name)).expanduser()
        return path if path.is_dir() else None
    except OSError:
        return None


def _data_name(folder: str) -> str:
    path = Path(folder)
    return path.parent.name if path.name in SPLIT_FOLDERS and path.parent.name else path.name


def trained_title(name: str) -> str | None:
    """'BASE fine-tuned on DATA' (or 'ARCH trained from scratch on DATA') for a folder `zoomvit train` wrote; None
    for any other model or a settings file that cannot be read."""
    folder = _folder(name)
    if folder is None or not (folder / SETTINGS_FILE).is_file():
        return None
    try:
        settings = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))["settings"]
        folders = [settings["data"]] if settings.get("data") else list(settings.get("train") or [])
        data = ", ".join(dict.fromkeys(_data_name(f) for f in folders)) or "its data"
        if settings.get("init") == "random":
            return f"{settings.get('arch', 'a ViT')} trained from scratch on {data}"
        return f"{Path(str(settings['model'])).name} fine-tuned on {data}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def display_name(name: str) -> str:
    """How the app names a model: its trained title, else a folder by its own name, else the name as given."""
    title = trained_title(name)
    if title:
        return title
    folder = _folder(name)
    return folder.resolve().name if folder is not None else str(name)


def model_card(name: str) -> str | None:
    """The model card (README.md, at most MAX_CARD_CHARS) of a folder `zoomvit train` wrote; None for any other
    model (a hub model's card is a long page of its own, with its own front matter)."""
    folder = _folder(name)
    if folder is None or not (folder / SETTINGS_FILE).is_file() or not (folder / CARD_FILE).is_file():
        return None
    card = folder / CARD_FILE
    try:
        with card.open(encoding="utf-8", errors="replace") as f:
            text = f.read(MAX_CARD_CHARS + 1)
    except OSError:
        return None
    return text if len(text) <= MAX_CARD_CHARS else text[:MAX_CARD_CHARS] + "\n\n(cut here)"
