"""The labelled image folder `zoomvit eval` reads: labels.csv's rows, checked, and the images decoded in
DataLoader worker processes while the model runs.

The folder holds images and labels.csv with at least `file,label_index`; with `x0,y0,x1,y1` (the object box
in the image's own pixels) the box metrics are added; `background` and `scale` columns, when present, split
the zoom results into groups.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from errors import ImageLoadError, ZoomViTError
from images import load_image

GROUP_COLUMNS = ("background", "scale")
BOX_COLUMNS = ("x0", "y0", "x1", "y1")


@dataclass
class Item:
    file: str
    label: int
    box: tuple[float, float, float, float] | None  # original image pixels
    groups: dict = field(default_factory=dict)  # values of the GROUP_COLUMNS the CSV has


def read_labels(folder, limit: int | None = None) -> list[Item]:
    """The rows of `folder`/labels.csv, checked: a clear ZoomViTError names the file and line of any problem."""
    folder = Path(folder)
    path = folder / "labels.csv"
    if not folder.is_dir():
        raise ZoomViTError(f"Data folder not found: {folder}")
    if not path.is_file():
        raise ZoomViTError(f"{path} not found: the folder needs a labels.csv with columns file,label_index.")
    if limit is not None and limit < 1:
        raise ZoomViTError(f"--limit must be at least 1, got {limit}.")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = set(reader.fieldnames or ())
    if not {"file", "label_index"} <= columns:
        raise ZoomViTError(f"{path} needs the columns file,label_index (found: {', '.join(sorted(columns))}).")
    box_columns = columns & set(BOX_COLUMNS)
    if box_columns and box_columns != set(BOX_COLUMNS):
        raise ZoomViTError(f"{path} has only some of the box columns x0,y0,x1,y1: give all four or none.")
    items = []
    for line, row in enumerate(rows, start=2):
        try:
            label = int(row["label_index"])
            box = tuple(float(row[k]) for k in BOX_COLUMNS) if box_columns else None
        except (TypeError, ValueError):
            raise ZoomViTError(f"{path}, line {line}: label_index must be an integer and the box numbers.") from None
        if not row["file"]:
            raise ZoomViTError(f"{path}, line {line}: empty file name.")
        groups = {k: row[k] for k in GROUP_COLUMNS if k in columns}
        items.append(Item(row["file"], label, box, groups))
    if not items:
        raise ZoomViTError(f"{path} lists no images.")
    return items[:limit] if limit else items


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
