"""The labelled image folders `zoomvit train` and `zoomvit eval` both read: one reader, so a folder one command
takes the other takes too.

A folder is either the ImageFolder layout (`FOLDER/CLASS_NAME/image.jpg`, classes in sorted folder order, as
torchvision and the Hugging Face `imagefolder` loader read it) or images with a labels.csv (UTF-8, at least
`file,label_index`; optionally `label_name`, the box `x0,y0,x1,y1` in the image's own pixels, finite with x0 < x1 and
y0 < y1, and the `background` and `scale` columns that split eval's zoom results into groups). labels.csv wins when
a folder has both. A labels.csv row names a file inside the folder: an absolute path or a `..` is refused, as the
ImageFolder layout cannot reach outside either; symlinks inside the folder are followed, as torchvision follows
them (a split made of links into one image store is common, and links are put there on purpose, a row's text not).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from zoomvit.errors import ZoomViTError

GROUP_COLUMNS = ("background", "scale")
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
SHOWN_NAMES = 3  # how many names (empty folders, duplicated files) a message shows
LABELS_CSV = "labels.csv"
CLASS_FOLDERS = "class folders"
# The names transformers ("LABEL_3") and a timm folder without label names ("class 3") give a class they do not
# know: a model named this way has no class names to match folder names against.
GENERIC_LABEL = re.compile(r"(?:LABEL_|class )(\d+)")


@dataclass
class Item:
    file: str  # relative to the folder (CLASS_NAME/image.jpg in the ImageFolder layout)
    label: int
    box: tuple[float, float, float, float] | None = None  # original image pixels
    groups: dict = field(default_factory=dict)  # values of the GROUP_COLUMNS the CSV has
    name: str = ""  # the class's name: its folder's, or the label_name column where the CSV has one


@dataclass
class LabelledFolder:
    folder: Path
    layout: str  # LABELS_CSV or CLASS_FOLDERS
    items: list[Item]
    notes: list[str] = field(default_factory=list)  # lines to tell the user (duplicated rows), not errors


def read_folder(folder, limit: int | None = None, every: int = 1) -> LabelledFolder:
    """A folder's images and labels, in either layout (see the module docstring), checked: a clear ZoomViTError
    names any problem. `every` K keeps every K-th image (a class-sorted list keeps every class), then `limit` the
    first N of those."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ZoomViTError(f"Data folder not found: {folder}")
    _check_sampling(limit, every)
    if (folder / LABELS_CSV).is_file():
        items, notes = _csv_rows(folder)
        layout = LABELS_CSV
    else:
        items, notes, layout = _class_folder_items(folder), [], CLASS_FOLDERS
    items = items[::every]
    return LabelledFolder(folder, layout, items[:limit] if limit else items, notes)


def read_labels(folder, limit: int | None = None, every: int = 1) -> list[Item]:
    """The rows of `folder`/labels.csv, checked (see `read_folder`; this one needs the labels.csv)."""
    folder = Path(folder)
    if folder.is_dir() and not (folder / LABELS_CSV).is_file():
        raise ZoomViTError(
            f"{folder / LABELS_CSV} not found: the folder needs a labels.csv with columns file,label_index."
        )
    return read_folder(folder, limit, every).items


def _check_sampling(limit, every) -> None:
    if limit is not None and limit < 1:
        raise ZoomViTError(f"--limit must be at least 1, got {limit}.")
    if not isinstance(every, int) or every < 1:
        raise ZoomViTError(f"--every must be a whole number, at least 1, got {every!r}.")


def _class_folder_items(folder: Path) -> list[Item]:
    """The ImageFolder layout: every file under each class folder (hidden ones aside), classes in sorted order."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ZoomViTError(f"{folder} has no class folders (CLASS_NAME/image.jpg) and no labels.csv.")
    items, empty = [], []
    for index, class_folder in enumerate(classes):
        members = sorted(p for p in class_folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not members:
            empty.append(class_folder.name)
        items += [Item(p.relative_to(folder).as_posix(), index, name=class_folder.name) for p in members]
    if empty:
        raise ZoomViTError(
            f"{folder} has {len(empty)} empty class folder(s): {_listed(empty)}: remove them or add images."
        )
    return items


def _csv_rows(folder: Path) -> tuple[list[Item], list[str]]:
    path = folder / LABELS_CSV
    try:  # utf-8-sig: a spreadsheet's byte order mark would otherwise be part of the first column's name
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]  # the line a row ends on: blank lines are skipped
            columns = set(reader.fieldnames or ())
    except UnicodeDecodeError as exc:
        raise ZoomViTError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8.") from None
    except csv.Error as exc:
        raise ZoomViTError(f"{path} is not a readable CSV file: {exc}.") from None
    if not {"file", "label_index"} <= columns:
        raise ZoomViTError(f"{path} needs the columns file,label_index (found: {', '.join(sorted(columns))}).")
    box_columns = columns & set(BOX_COLUMNS)
    if box_columns and box_columns != set(BOX_COLUMNS):
        raise ZoomViTError(f"{path} has only some of the box columns x0,y0,x1,y1: give all four or none.")
    items, lines = [], []
    for line, row in rows:
        where = f"{path}, line {line}"
        label = _whole_number(row["label_index"], f"{where}: label_index")
        if label < 0:
            raise ZoomViTError(f"{where}: label_index must be 0 or more, got {label}.")
        box = _box(row, where) if box_columns else None
        groups = {k: row[k] for k in GROUP_COLUMNS if k in columns}
        items.append(Item(_inside(row["file"], where), label, box, groups, (row.get("label_name") or "").strip()))
        lines.append(line)
    if not items:
        raise ZoomViTError(f"{path} lists no images.")
    return items, _duplicates(path, items, lines)


def _inside(file, where: str) -> str:
    """A row's file as a path below the folder: refused when empty, absolute or holding a `..` (with a symlinked
    folder on the way, `a/../b` may leave the folder even where its text stays inside)."""
    if not file:
        raise ZoomViTError(f"{where}: empty file name.")
    parts = PurePosixPath(file).parts
    if PurePosixPath(file).is_absolute() or ".." in parts:
        raise ZoomViTError(
            f"{where}: file {file!r} is not inside the data folder: name files relative to the folder, without '..'."
        )
    return file


def _duplicates(path: Path, items: list[Item], lines: list[int]) -> list[str]:
    """A note (not an error) when labels.csv lists a file more than once: each row counts as an image of its own
    (trained on twice, counted twice in eval's figures), which is seldom meant."""
    seen: dict[str, list[int]] = {}
    for item, line in zip(items, lines):
        seen.setdefault(PurePosixPath(item.file).as_posix().removeprefix("./"), []).append(line)
    repeated = {file: at for file, at in seen.items() if len(at) > 1}
    if not repeated:
        return []
    shown = [f"{file} (lines {', '.join(map(str, at))})" for file, at in repeated.items()]
    return [
        f"{path} lists {len(repeated)} file(s) more than once, each row counted as an image of its own: "
        f"{_listed(shown)}."
    ]


def labels_for_model(data: LabelledFolder, id2label: dict) -> list[Item]:
    """The items with labels in the model's class indices. A labels.csv's label_index is one already (checked to
    be one of the model's). Class folders are matched to the model's labels by name; a model whose labels are only
    the generic LABEL_i or `class i` has no names to match, and gets sorted folder order, as `zoomvit train` gives
    it."""
    num_labels = len(id2label)
    if data.layout == LABELS_CSV:
        for item in data.items:
            if item.label >= num_labels:
                raise ZoomViTError(
                    f"{item.file}: label_index {item.label} is outside this model's 0..{num_labels - 1}: "
                    "labels.csv's label_index is the model's class index."
                )
        return data.items
    names = {int(i): str(name) for i, name in id2label.items()}
    if all(GENERIC_LABEL.fullmatch(name) and GENERIC_LABEL.fullmatch(name)[1] == str(i) for i, name in names.items()):
        outside = sorted({item.name for item in data.items if item.label >= num_labels})
        if outside:
            raise ZoomViTError(
                f"{data.folder} has more class folders than this model has classes ({num_labels}), and the model "
                f"names none of its classes to match them by: {_listed(outside)} have no class."
            )
        return data.items
    index_of: dict[str, list[int]] = {}
    for i, name in sorted(names.items()):
        index_of.setdefault(name, []).append(i)
    mapped = {}
    for name in dict.fromkeys(item.name for item in data.items):
        found = index_of.get(name, [])
        if len(found) != 1:
            raise ZoomViTError(
                f"{data.folder}: the class folder {name!r} "
                + (
                    f"names {len(found)} of this model's classes ({', '.join(map(str, found))}): give a labels.csv."
                    if found
                    else "is none of this model's labels: name class folders as the model's labels "
                    f"(e.g. {names[min(names)]!r}), or give a labels.csv."
                )
            )
        mapped[name] = found[0]
    return [Item(item.file, mapped[item.name], item.box, item.groups, item.name) for item in data.items]


def _listed(names: list[str]) -> str:
    return ", ".join(names[:SHOWN_NAMES]) + (
        f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
    )


def _shown(value) -> str:
    return "nothing" if value is None or not value.strip() else repr(value)  # None: the row has fewer fields


def _whole_number(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ZoomViTError(f"{name} must be a whole number, got {_shown(value)}.") from None


def _box(row: dict, where: str) -> tuple[float, float, float, float]:
    """x0,y0,x1,y1 of a row: finite numbers with x0 < x1 and y0 < y1 (an infinite box holds every map peak)."""
    box = []
    for column in BOX_COLUMNS:
        value = row[column]
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ZoomViTError(f"{where}: {column} must be a finite number, got {_shown(value)}.")
        box.append(number)
    for low, high in (("x0", "x1"), ("y0", "y1")):
        if box[BOX_COLUMNS.index(high)] <= box[BOX_COLUMNS.index(low)]:
            raise ZoomViTError(
                f"{where}: {high} must be greater than {low}, got {low} = {row[low]!r} and {high} = {row[high]!r}."
            )
    return tuple(box)
