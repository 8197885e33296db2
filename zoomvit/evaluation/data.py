"""The labelled image folder `zoomvit eval` reads: labels.csv's rows, checked, and the images decoded in
DataLoader worker processes while the model runs (workers that die with it, see `die_with_parent`).

The folder holds images and labels.csv (UTF-8) with at least `file,label_index`; with `x0,y0,x1,y1` (the object
box in the image's own pixels: finite, x0 < x1, y0 < y1) the box metrics are added; `background` and `scale`
columns, when present, split the zoom results into groups.
"""

from __future__ import annotations

import csv
import ctypes
import functools
import math
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from zoomvit.errors import ImageLoadError, ZoomViTError
from zoomvit.images import load_image

GROUP_COLUMNS = ("background", "scale")
BOX_COLUMNS = ("x0", "y0", "x1", "y1")


@dataclass
class Item:
    file: str
    label: int
    box: tuple[float, float, float, float] | None  # original image pixels
    groups: dict = field(default_factory=dict)  # values of the GROUP_COLUMNS the CSV has
    name: str = ""  # the label_name column, where the CSV has one (zoomvit train names its classes by it)


def read_labels(folder, limit: int | None = None, every: int = 1) -> list[Item]:
    """The rows of `folder`/labels.csv, checked: a clear ZoomViTError names the file and line of any problem.
    `every` K keeps every K-th row (a class-sorted list keeps every class), then `limit` the first N of those."""
    folder = Path(folder)
    path = folder / "labels.csv"
    if not folder.is_dir():
        raise ZoomViTError(f"Data folder not found: {folder}")
    if not path.is_file():
        raise ZoomViTError(f"{path} not found: the folder needs a labels.csv with columns file,label_index.")
    if limit is not None and limit < 1:
        raise ZoomViTError(f"--limit must be at least 1, got {limit}.")
    if not isinstance(every, int) or every < 1:
        raise ZoomViTError(f"--every must be a whole number, at least 1, got {every!r}.")
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
    items = []
    for line, row in rows:
        where = f"{path}, line {line}"
        label = _whole_number(row["label_index"], f"{where}: label_index")
        box = _box(row, where) if box_columns else None
        if not row["file"]:
            raise ZoomViTError(f"{where}: empty file name.")
        groups = {k: row[k] for k in GROUP_COLUMNS if k in columns}
        items.append(Item(row["file"], label, box, groups, (row.get("label_name") or "").strip()))
    if not items:
        raise ZoomViTError(f"{path} lists no images.")
    items = items[::every]
    return items[:limit] if limit else items


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


class Images(Dataset):
    """The items' images, decoded (in DataLoader workers): (index, LoadedImage, None), or (index, None, the error)
    for a file that cannot be read, which is skipped; raised in a worker, the error would end the whole run."""

    def __init__(self, folder: Path, items: list[Item]):
        self.folder, self.items = folder, items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        try:
            return index, load_image(self.folder / self.items[index].file), None
        except ImageLoadError as exc:
            return index, None, str(exc)


def default_workers(world: int = 1) -> int:
    """DataLoader processes per evaluating process: its share of the cores less one for the model, 1 to 4 (a photo
    decodes in milliseconds, the model takes tens to hundreds per image: one worker keeps ahead of it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(1, min(4, cores // world - 1))


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent: int, worker_id: int = 0) -> None:
    """A DataLoader worker_init_fn (bind `parent`, the evaluating process's pid, before the workers start): on
    Linux the worker is killed when the process that started it dies. A killed eval's worker would otherwise live
    on, adopted by PID 1, holding its memory and, under torchrun, the launcher's pipes."""
    if not sys.platform.startswith("linux"):
        return
    # The signal comes when the thread that forked this worker ends: the DataLoader's, the evaluating one.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent and not _alive(parent):  # it died before the prctl call: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def decode_ahead(images: Images, batches, workers: int) -> DataLoader:
    """The batches' images, decoded ahead in `workers` processes that die with this one (see
    `die_with_parent`)."""
    return DataLoader(
        images,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=list,
        worker_init_fn=functools.partial(die_with_parent, os.getpid()),
    )
