"""The labelled folders `zoomvit train` reads, checked before any training starts, and their datasets.

A split is read by `zoomvit.labelled_folders`, as `zoomvit eval` reads its folder: the ImageFolder layout
(`SPLIT/CLASS_NAME/image.jpg`, classes in sorted folder order, what torchvision and the Hugging Face `imagefolder`
loader read) or a folder with a labels.csv (`file,label_index` and optionally `label_name`). labels.csv wins when a
folder has both, so a model's label indices are the ones `zoomvit eval` checks it against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from zoomvit.errors import ZoomViTError
from zoomvit.labelled_folders import read_folder

SHOWN_NAMES = 3  # how many skipped files a message names
# A head may have classes no training image shows (a labels.csv keeping another dataset's indices for a subset of
# its classes), but not more of them than classes it learns: label_index 100000 on 3 classes is a typo, not a
# 100,001-class model (and 2000000000 would not fit in memory).
MAX_HEAD_PER_CLASS = 2


@dataclass
class Split:
    name: str  # "train", "val" or "test"
    folder: Path
    files: list[Path]
    labels: list[int]
    class_names: dict[int, str]  # label index -> name, as the folder or labels.csv names them
    skipped: list[tuple[Path, str]]  # (file, why) of files that are not readable images
    folders: list = field(default_factory=list)  # every folder it was read from
    notes: list = field(default_factory=list)  # lines to tell the user (labels.csv's duplicated rows)


def find_splits(data: str | None, train: list | None, val: str | None, test: str | None = None) -> dict:
    """{split name: [folders]}: DATA/train and DATA/val (and DATA/test when present), or --train DIR [DIR ...]
    with an optional --val and --test."""
    if data and (train or val or test):
        raise ZoomViTError("Give a data folder with train/ and val/ inside, or --train (--val, --test): not both.")
    if data:
        root = Path(data)
        if not root.is_dir():
            raise ZoomViTError(f"Data folder not found: {root}")
        found = {name: [root / name] for name in ("train", "val", "test") if (root / name).is_dir()}
        missing = [name for name in ("train", "val") if name not in found]
        if missing:
            raise ZoomViTError(
                f"{root} has no {' or '.join(m + '/' for m in missing)} folder: it needs train/ and "
                "val/ (and optionally test/), or give --train DIR [DIR ...] (and --val DIR)."
            )
    elif train:
        found = {
            "train": [Path(t) for t in train],
            **({"val": [Path(val)]} if val else {}),
            **({"test": [Path(test)]} if test else {}),
        }
    else:
        raise ZoomViTError("Training needs a data folder (with train/ and val/) or --train DIR [DIR ...].")
    for name, folders in found.items():
        for folder in folders:
            if not folder.is_dir():
                raise ZoomViTError(f"The {name} folder was not found: {folder}")
    return found


def read_splits(found: dict) -> dict:
    """Each split's images, several folders of one split (train and val trained on together) joined."""
    splits = {}
    for name, folders in found.items():
        parts = [read_split(name, folder) for folder in folders]
        first = parts[0]
        for part in parts[1:]:
            clash = [
                i for i in set(part.class_names) & set(first.class_names) if part.class_names[i] != first.class_names[i]
            ]
            if clash:
                i = clash[0]
                raise ZoomViTError(
                    f"Class {i} is '{first.class_names[i]}' in {first.folder} but '{part.class_names[i]}' "
                    f"in {part.folder}: folders trained on together must list the same classes."
                )
            first = Split(
                name,
                first.folder,
                first.files + part.files,
                first.labels + part.labels,
                {**part.class_names, **first.class_names},
                first.skipped + part.skipped,
                first.folders + part.folders,
                first.notes + part.notes,
            )
        splits[name] = first
    return splits


def read_split(name: str, folder: Path) -> Split:
    """The images and labels of one split, each image's header read (unreadable files are skipped and counted)."""
    data = read_folder(folder)
    files, labels = [folder / item.file for item in data.items], [item.label for item in data.items]
    names = {}
    for item in data.items:  # labels.csv may name a class on some of its rows only
        if item.name:
            names.setdefault(item.label, item.name)
    for label in labels:
        names.setdefault(label, f"class {label}")
    kept_files, kept_labels, skipped = [], [], []
    for file, label in zip(files, labels):
        why = _not_an_image(file)
        if why:
            skipped.append((file, why))
        else:
            kept_files.append(file)
            kept_labels.append(label)
    if not kept_files:
        raise ZoomViTError(
            f"The {name} folder {folder} holds no readable image"
            + (f" ({len(skipped)} files skipped: {_named(skipped)})." if skipped else ".")
        )
    return Split(name, folder, kept_files, kept_labels, names, skipped, [folder], data.notes)


def _not_an_image(file: Path) -> str:
    """Why `file` cannot be trained on ('' when it can): reads the header only, so a check of 10,000 files is
    quick; a file whose pixels turn out broken later is caught by the dataset."""
    if not file.is_file():
        return "missing"
    try:
        with Image.open(file) as image:
            image.size  # noqa: B018 (the header is parsed here)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return "not an image" if "cannot identify" in str(exc) else str(exc).split("\n")[0]
    return ""


def _named(skipped) -> str:
    shown = ", ".join(f"{file.name} ({why})" for file, why in skipped[:SHOWN_NAMES])
    return shown + (f" and {len(skipped) - SHOWN_NAMES} more" if len(skipped) > SHOWN_NAMES else "")


def check_splits(splits: dict[str, Split]) -> tuple[dict[int, str], list[str]]:
    """(id2label, lines to tell the user) after the checks across splits: at least two classes in train, no class
    in val or test that train lacks, and the same class names where both name them."""
    train = splits["train"]
    classes = sorted(set(train.labels))
    if len(classes) < 2:
        raise ZoomViTError(
            f"The train folder {train.folder} has one class only ({train.class_names[classes[0]]}): "
            "a classifier needs at least two."
        )
    num_labels = max(classes) + 1
    if num_labels > MAX_HEAD_PER_CLASS * len(classes):
        raise ZoomViTError(
            f"The train folder's label_index values run to {max(classes)} for {len(classes)} classes: a "
            f"{num_labels}-class head would have more classes without a training image than with one; label "
            f"indices number the classes (at most {MAX_HEAD_PER_CLASS * len(classes) - 1} here): renumber them "
            f"0..{len(classes) - 1}."
        )
    notes = [note for split in splits.values() for note in split.notes] + [
        f"{split.name}: skipped {len(split.skipped)} file(s) that are not readable images: {_named(split.skipped)}"
        for split in splits.values()
        if split.skipped
    ]
    for split in (s for s in splits.values() if s.name != "train"):
        unknown = sorted(set(split.labels) - set(classes))
        if unknown:
            shown = ", ".join(split.class_names[i] for i in unknown[:SHOWN_NAMES])
            raise ZoomViTError(
                f"The {split.name} folder has {len(unknown)} class(es) that train lacks: {shown}"
                f"{' ...' if len(unknown) > SHOWN_NAMES else ''}."
            )
        renamed = [i for i in set(split.labels) if split.class_names[i] != train.class_names[i]]
        if renamed:
            i = renamed[0]
            raise ZoomViTError(
                f"Class {i} is '{train.class_names[i]}' in train but '{split.class_names[i]}' in "
                f"{split.name}: the splits must list the same classes."
            )
    id2label = {i: train.class_names.get(i, f"class {i}") for i in range(num_labels)}
    return id2label, notes


class ImageDataset(Dataset):
    """(pixel_values, labels) of a split through `transform` (PIL image -> tensor); an image that fails to decode
    in the middle of training is reported with its name."""

    def __init__(self, split: Split, transform):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.files)

    def __getitem__(self, index: int) -> dict:
        file = self.split.files[index]
        try:
            with Image.open(file) as image:
                pixels = self.transform(image.convert("RGB"))
        except OSError as exc:
            raise ZoomViTError(f"Could not decode {file} during training: {exc}") from None
        return {"pixel_values": pixels, "labels": torch.tensor(self.split.labels[index])}
