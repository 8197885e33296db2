"""The labelled folders train and eval share (zoomvit.labelled_folders): both layouts, the class folders matched to
the model's labels, rows that leave the folder, duplicated rows and label indices far beyond the classes."""

import csv
import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zoomvit import cli
from zoomvit.cli import evaluate as cli_evaluate
from zoomvit.errors import ZoomViTError
from zoomvit.evaluation import runner as evaluation
from zoomvit.labelled_folders import labels_for_model, read_folder, read_labels
from zoomvit.training import data as train_data
from zoomvit.training import trainer as training

CLASSES = ("apple", "mango", "zebra")  # sorted folder order
PER_CLASS = 2


def make_class_folders(root: Path, seed: int = 0) -> Path:
    """A few random images in CLASS_NAME/ folders, different sizes so every image is told apart."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 255, (32 + 8 * i, 48 + 8 * c, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def as_labels_csv(class_folders: Path, root: Path, index_of: dict) -> Path:
    """The same images flat in `root` with a labels.csv giving each class the index `index_of` says."""
    root.mkdir()
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label_index"])
        for name in CLASSES:
            for image in sorted((class_folders / name).iterdir()):
                (root / f"{name}_{image.name}").write_bytes(image.read_bytes())
                writer.writerow([f"{name}_{image.name}", index_of[name]])
    return root


def write_csv(folder: Path, *lines: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.csv").write_text("\n".join(["file,label_index", *lines]) + "\n")
    return folder


def per_image(result) -> list[tuple[str, int, int]]:
    """(class, label, prediction) per image, the class read off either layout's file name."""
    return [(re.split(r"[/_]", row["file"])[0], row["label"], row["predicted"]) for row in result.rows]


# ---- item 2: eval reads the ImageFolder layout -----------------------------------------------------------


def test_eval_reads_class_folders_as_their_labels_csv_form(tiny_vit, tmp_path):
    """A model with only generic LABEL_i names: classes in sorted folder order, as train numbers them."""
    folders = make_class_folders(tmp_path / "folders")
    flat = as_labels_csv(folders, tmp_path / "flat", {name: i for i, name in enumerate(CLASSES)})
    runs = [
        evaluation.evaluate(tiny_vit, d, tasks=("zoom",), after_block=1, workers=0, progress=False)
        for d in (folders, flat)
    ]
    assert per_image(runs[0]) == per_image(runs[1])
    assert [label for _, label, _ in per_image(runs[0])] == [0, 0, 1, 1, 2, 2]
    assert runs[0].summary["top1"] == runs[1].summary["top1"] and runs[0].summary["n"] == 6


def test_eval_matches_class_folders_to_the_models_labels_by_name(tiny_vit, tmp_path):
    """The model's label order is not the folders' sorted order: each folder gets its name's index."""
    names = {i: f"other {i}" for i in range(len(tiny_vit.id2label))} | {2: "zebra", 5: "apple", 7: "mango"}
    named = dataclasses.replace(tiny_vit, id2label=names)
    folders = make_class_folders(tmp_path / "folders")
    flat = as_labels_csv(folders, tmp_path / "flat", {"zebra": 2, "apple": 5, "mango": 7})
    runs = [
        evaluation.evaluate(named, d, tasks=("zoom",), after_block=1, workers=0, progress=False)
        for d in (folders, flat)
    ]
    assert per_image(runs[0]) == per_image(runs[1])
    assert [label for _, label, _ in per_image(runs[0])] == [5, 5, 7, 7, 2, 2]


def test_class_folders_the_model_does_not_name_are_refused_in_one_line(tiny_vit, tmp_path):
    folders = make_class_folders(tmp_path / "folders")
    data = read_folder(folders)
    named = {i: f"class name {i}" for i in range(10)} | {0: "apple", 1: "mango"}
    with pytest.raises(ZoomViTError, match="the class folder 'zebra' is none of this model's labels") as refused:
        labels_for_model(data, named)
    assert "\n" not in str(refused.value)
    with pytest.raises(ZoomViTError, match=r"'apple' names 2 of this model's classes \(0, 3\)"):
        labels_for_model(data, {**named, 2: "zebra", 3: "apple"})
    with pytest.raises(ZoomViTError, match="more class folders than this model has classes \\(2\\).*zebra"):
        labels_for_model(data, {0: "LABEL_0", 1: "LABEL_1"})


def test_cli_eval_refuses_an_unknown_class_folder_before_the_model_loads(
    deit_model_path, tmp_path, monkeypatch, capsys
):
    folders = make_class_folders(tmp_path / "folders")
    monkeypatch.setattr(cli_evaluate, "load_bundle", lambda *args: pytest.fail("the model was loaded"))
    argv = ["eval", "--data", str(folders), "--model", deit_model_path, "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "the class folder 'apple' is none of this model's labels" in err and err.count("\n") == 1, err


def test_a_model_trained_on_class_folders_is_evaluated_on_class_folders(tmp_path, capsys):
    """The loop closed: what `zoomvit train` takes, `zoomvit eval` takes, with the same classes in the same order."""
    train, val = make_class_folders(tmp_path / "train", seed=1), make_class_folders(tmp_path / "val", seed=2)
    model = tmp_path / "model"
    settings = dict(init="random", arch="vit-micro", image_size=32, patch_size=4, epochs=1, batch_size=6, workers=0)
    training.train(training.TrainOptions(train=[str(train)], val=str(val), out=str(model), **settings), progress=False)
    out = tmp_path / "eval"
    argv = ["eval", "--data", str(val), "--model", str(model), "--out", str(out), "--tasks", "intent"]
    assert cli.main([*argv, "--after-block", "1", "--workers", "0", "--json"]) == 0, capsys.readouterr().err
    evaluated = json.loads(capsys.readouterr().out)
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["file"], int(row["label"])) for row in rows] == [
        (f"{name}/{i}.png", c) for c, name in enumerate(CLASSES) for i in range(PER_CLASS)
    ]
    val_accuracy = json.loads((model / "train_log.json").read_text())[-1]["val_accuracy"]
    assert evaluated["n"] == len(rows) and abs(evaluated["top1"] - val_accuracy) < 1e-9  # the same preprocessing


# ---- item 9: rows that leave the folder --------------------------------------------------------------------


@pytest.mark.parametrize("file", ["../secret.jpg", "/proc/self/environ", "sub/../../secret.jpg", "./a/../.."])
def test_a_row_naming_a_file_outside_the_folder_is_refused(tmp_path, file):
    folder = write_csv(tmp_path / "data", "inside.jpg,0", f"{file},1")
    expected = f"{folder / 'labels.csv'}, line 3: file {file!r} is not inside the data folder"
    with pytest.raises(ZoomViTError, match=re.escape(expected)):
        read_labels(folder)
    with pytest.raises(ZoomViTError, match=re.escape(expected)):  # train reads it with the same reader
        train_data.read_split("train", folder)


def test_symlinks_inside_the_folder_are_followed_as_torchvision_follows_them(tmp_path):
    store = make_class_folders(tmp_path / "store")
    folder = write_csv(tmp_path / "data", "linked.png,1")
    os.symlink(store / "mango" / "0.png", folder / "linked.png")
    split = train_data.read_split("train", folder)
    assert split.files == [folder / "linked.png"] and split.skipped == []


# ---- item 6: duplicated rows, label indices far beyond the classes -----------------------------------------


def test_duplicated_rows_are_a_warning_not_an_error(tmp_path):
    folder = write_csv(tmp_path / "data", "a.jpg,0", "b.jpg,1", "./a.jpg,0", "c.jpg,1", "b.jpg,1")
    data = read_folder(folder)
    assert len(data.items) == 5
    assert data.notes == [
        f"{folder / 'labels.csv'} lists 2 file(s) more than once, each row counted as an image of its own: "
        "a.jpg (lines 2, 4), b.jpg (lines 3, 6)."
    ]
    assert read_folder(write_csv(tmp_path / "once", "a.jpg,0", "b.jpg,1")).notes == []


def test_cli_eval_warns_of_duplicated_rows_and_refuses_labels_the_model_lacks_before_it_loads(
    deit_model_path, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(cli_evaluate, "load_bundle", lambda *args: pytest.fail("the model was loaded"))
    folder = write_csv(tmp_path / "data", "a.jpg,1", "a.jpg,1", "b.jpg,1000")  # DeiT-Tiny has classes 0..999
    assert cli.main(["eval", "--data", str(folder), "--model", deit_model_path, "--out", str(tmp_path / "out")]) == 2
    warning, error = capsys.readouterr().err.splitlines()
    assert warning.startswith("zoomvit: warning: ") and "lists 1 file(s) more than once" in warning
    assert error == "zoomvit: error: b.jpg: label_index 1000 is outside this model's 0..999: labels.csv's " + (
        "label_index is the model's class index."
    )


def labelled_split(tmp_path, name: str, labels: list[int]) -> train_data.Split:
    folder = tmp_path / name
    make_class_folders(folder / "images")
    files = sorted((folder / "images").rglob("*.png"))
    write_csv(folder, *(f"{f.relative_to(folder).as_posix()},{label}" for f, label in zip(files, labels)))
    return train_data.read_split("train", folder)


def test_train_refuses_label_indices_far_beyond_its_classes(tmp_path):
    sparse = {"train": labelled_split(tmp_path, "sparse", [0, 0, 2, 2, 5, 5])}  # a 6-class head for 3: allowed
    assert len(train_data.check_splits(sparse)[0]) == 6
    typo = {"train": labelled_split(tmp_path, "typo", [0, 0, 1, 1, 100000, 100000])}
    with pytest.raises(ZoomViTError, match=r"run to 100000 for 3 classes: a 100001-class head") as refused:
        train_data.check_splits(typo)
    assert "renumber them 0..2" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(ZoomViTError, match="line 2: label_index must be 0 or more, got -1"):
        read_folder(write_csv(tmp_path / "negative", "a.jpg,-1"))


def test_train_refuses_a_huge_label_index_in_one_line_before_anything_is_built(tmp_path, capsys):
    folder = tmp_path / "data"
    for split in ("train", "val"):
        make_class_folders(folder / split / "images")
        files = sorted((folder / split / "images").rglob("*.png"))
        labels = [0, 0, 1, 1, 2000000000, 2000000000]  # in val too: the unfixed check of val's classes passed
        write_csv(folder / split, *(f"images/{f.parent.name}/{f.name},{n}" for f, n in zip(files, labels)))
    argv = ["train", str(folder), "--init", "random", "--arch", "vit-micro", "--image-size", "32"]
    assert cli.main([*argv, "--patch-size", "4", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "label_index values run to 2000000000 for 3 classes" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_train_tells_of_duplicated_rows(tmp_path):
    split = labelled_split(tmp_path, "twice", [0, 0, 1, 1, 2, 2])
    (split.folder / "labels.csv").write_text(
        (split.folder / "labels.csv").read_text() + f"{split.files[0].relative_to(split.folder).as_posix()},0\n"
    )
    _, notes = train_data.check_splits({"train": train_data.read_split("train", split.folder)})
    assert any("lists 1 file(s) more than once" in note for note in notes)
