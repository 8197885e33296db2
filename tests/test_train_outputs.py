"""What `zoomvit train` writes and where: the model card's test figure, --overwrite and --out's rules, checkpoints
that survive a full disk, the curves; on a vit-micro and a few CIFAR-10 images (test_train.py's)."""

import errno
import json
import re

import pytest
import torch
from PIL import Image
from test_train import CLASSES, StopAfterFirstCheckpoint, image_folder, options, run_cli  # noqa: F401 (a fixture)

from zoomvit.errors import ZoomViTError
from zoomvit.models import load_model
from zoomvit.training import outputs as train_outputs
from zoomvit.training import trainer as training

SCRATCH = dict(init="random", arch="vit-micro", image_size=32, patch_size=4)
SCRATCH_ARGV = ["--init", "random", "--arch", "vit-micro", "--image-size", "32", "--patch-size", "4"]


def accuracy_of_saved_model(out, folder) -> float:
    """Top-1 of the model saved in `out` on an ImageFolder, through plain transformers calls."""
    bundle = load_model(str(out), device="cpu", dtype="float32")
    right = total = 0
    for index, name in enumerate(CLASSES):
        for file in sorted((folder / name).iterdir()) if (folder / name).is_dir() else []:
            with Image.open(file) as image:
                pixels = bundle.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                right += int(bundle.model(pixels).logits.argmax(-1).item() == index)
            total += 1
    return right / total


def test_the_cards_test_figure_is_the_saved_models_with_loader_workers(image_folder, tmp_path):
    """With worker processes the Trainer once answered evaluate(test) with its cached val loader: the card's "test"
    figure was the val set's. Here test has 4 images and val 9, so the two can only agree at 0 or 100%."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        (data / split).symlink_to(image_folder / split)
    for name in CLASSES[:2]:
        (data / "test" / name).mkdir(parents=True)
        for file in sorted((image_folder / "test" / name).iterdir()):
            (data / "test" / name / file.name).symlink_to(file)
    out = tmp_path / "run"
    summary = training.train(options(out, data=str(data), epochs=2, workers=1, **SCRATCH), progress=False)
    tested = accuracy_of_saved_model(out, data / "test")
    assert summary["test_accuracy"] == pytest.approx(tested)
    assert f"**Test top-1**: {100 * tested:.2f}% (4 images)" in (out / "README.md").read_text()


def test_overwrite_replaces_the_run_and_keeps_the_users_files(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [image_folder, *SCRATCH_ARGV, "--epochs", "1", "--workers", "0", "--out", out]
    assert run_cli(*argv, capsys=capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "checkpoint-99").mkdir()  # an earlier run's checkpoint goes with the run
    code, err = run_cli(*argv, "--overwrite", capsys=capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in train_outputs.checkpoints(out)] == ["checkpoint-1"]  # 18 images in one batch
    assert not (out / "checkpoints" / "checkpoint-99").exists()
    assert len(json.loads((out / "train_log.json").read_text())) == 1


@pytest.mark.parametrize("split", ["train", "val"])
def test_out_inside_a_data_folder_is_refused_in_one_line(split, image_folder, tmp_path, capsys):
    out = image_folder / split / "run"
    code, err = run_cli(image_folder, *SCRATCH_ARGV, "--out", out, capsys=capsys)
    assert code == 2 and f"is inside the {split} folder" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def fill_the_disk_at(step: int, real_save):
    """torch.save as the Trainer calls it, failing as a full disk does (part of the file written) on the optimizer
    of checkpoint `step`."""

    def save(obj, path, *args, **kwargs):
        if str(path).endswith(f"checkpoint-{step}/optimizer.pt"):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a zip")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    return save


def test_a_full_disk_keeps_the_last_complete_checkpoint_and_resume_takes_it(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    settings = dict(data=str(image_folder), epochs=3, **SCRATCH)
    monkeypatch.setattr(torch, "save", fill_the_disk_at(6, torch.save))
    with pytest.raises(ZoomViTError) as failed:
        training.train(options(out, **settings), progress=False)
    monkeypatch.undo()
    message = str(failed.value)
    assert message.startswith("Disk full while writing to ") and str(out / "checkpoints") in message
    assert "\n" not in message
    assert [p.name for p in train_outputs.checkpoints(out)] == ["checkpoint-3"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3"]  # no half-written one
    resumed = training.train(options(out, resume=True, **settings), progress=False)
    assert resumed["steps"] == 9 and (out / "model.safetensors").is_file()


def test_the_curves_have_whole_epochs_and_mark_the_best(tmp_path):
    rows = [
        {"epoch": e, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": v}
        for e, v in ((1, 0.4), (2, 0.7), (3, 0.7))  # the tie at 3 does not replace epoch 2, as in the Trainer
    ]
    figure = train_outputs.curves_figure(rows)
    for ax in figure.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        marks = [line for line in ax.get_lines() if re.match(r"best val \(epoch 2", line.get_label())]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [2, 2]
    no_val = [{**r, "val_loss": None, "val_accuracy": None} for r in rows]
    assert not any("best" in line.get_label() for ax in train_outputs.curves_figure(no_val).axes for line in ax.lines)


def test_accumulated_batches_log_and_learn_as_one_batch_of_their_size(image_folder, tmp_path):
    """The loss is per image over the whole optimizer step: two accumulated batches of 3 are one batch of 6 (the
    same images, augmented alike), not twice its loss."""
    settings = dict(data=str(image_folder), epochs=2, warmup=0, **SCRATCH)
    training.train(options(tmp_path / "one", batch_size=6, **settings), progress=False)
    training.train(options(tmp_path / "two", batch_size=3, grad_accum=2, **settings), progress=False)
    one, two = (json.loads((tmp_path / name / "train_log.json").read_text()) for name in ("one", "two"))
    for key in ("train_loss", "val_loss"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4), key
