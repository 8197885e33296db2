"""`zoomvit train`: fine-tuning (Hugging Face and timm layouts), from scratch, --resume, torchrun and bad input, on
tiny models and a few CIFAR-10 images from ../shared (training for real is benchmarks/, not a test)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_configs import config_for
from PIL import Image
from safetensors.torch import load_file
from test_timm import save_timm_folder, tiny_timm
from transformers import TrainerCallback, ViTForImageClassification, ViTImageProcessorPil

from zoomvit import cli
from zoomvit.cli import train as train_cli
from zoomvit.models import load_model
from zoomvit.training import models as train_models
from zoomvit.training import trainer as training
from zoomvit.training.outputs import Interrupted

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("0_airplane", "1_automobile", "2_bird")
PER_CLASS = {"train": 6, "val": 3, "test": 2}


@pytest.fixture(scope="module")
def image_folder(shared_dir, tmp_path_factory) -> Path:
    """A few CIFAR-10 images in the ImageFolder layout: SPLIT/CLASS/image.jpg, no labels.csv."""
    root = tmp_path_factory.mktemp("imagefolder")
    source = {"train": "train", "val": "test", "test": "test"}
    for split, count in PER_CLASS.items():
        offset = PER_CLASS["val"] if split == "test" else 0  # test and val come from CIFAR's test split: no overlap
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for file in sorted((shared_dir / "data" / "cifar-10" / source[split] / name).iterdir())[
                offset : offset + count
            ]:
                shutil.copy(file, folder / file.name)
    return root


@pytest.fixture(scope="module")
def csv_folder(image_folder, tmp_path_factory) -> Path:
    """The same images as flat folders with labels.csv (file,label_index,label_name): what `zoomvit eval` reads."""
    root = tmp_path_factory.mktemp("csvfolder")
    for split in PER_CLASS:
        (root / split).mkdir()
        with open(root / split / "labels.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "label_index", "label_name"])
            for index, name in enumerate(CLASSES):
                for file in sorted((image_folder / split / name).iterdir()):
                    shutil.copy(file, root / split / f"{name}_{file.name}")
                    writer.writerow([f"{name}_{file.name}", index, name.split("_", 1)[1]])
    return root


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory) -> Path:
    """A random ViT from the real DeiT-Tiny config's keys (sizes shrunk), saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-hf")
    torch.manual_seed(0)
    ViTForImageClassification(config_for("vit")).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def options(out, **changes) -> training.TrainOptions:
    base = dict(out=str(out), epochs=1, batch_size=6, workers=0, lr=1e-3)
    return training.TrainOptions(**{**base, **changes})


def run_cli(*argv, capsys=None):
    code = cli.main(["train", *map(str, argv)])
    return code, (capsys.readouterr().err if capsys else "")


def test_fine_tuning_a_hf_folder_from_class_folders_writes_a_model_every_command_loads(
    image_folder, csv_folder, tiny_hf_folder, tmp_path, capsys
):
    out = tmp_path / "tuned"
    code, err = run_cli(
        image_folder,
        "--model",
        tiny_hf_folder,
        "--out",
        out,
        "--epochs",
        "2",
        "--batch-size",
        "6",
        "--workers",
        "0",
        capsys=capsys,
    )
    assert code == 0, err
    assert "\r" not in err and "\x1b" not in err, "progress bars written to a file"  # stderr is not a terminal here
    assert "5-class head is replaced by a new 3-class one" in err
    assert "epoch 2/2: train loss" in err and "test top-1" in err
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "train_log.csv",
        "train_log.json",
        "train_curves.png",
        "README.md",
    ):
        assert (out / name).is_file(), name
    bundle = load_model(str(out), device="cpu", dtype="float32")
    assert bundle.id2label == dict(enumerate(CLASSES))
    rows = json.loads((out / "train_log.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(0 <= r["train_accuracy"] <= 1 and r["val_loss"] > 0 and r["learning_rate"] > 0 for r in rows)
    card = (out / "README.md").read_text()
    assert "Best val top-1" in card and "Test top-1" in card and f"--model {tiny_hf_folder}" in card
    # The saved weights are the best epoch's: its val accuracy is the best in the log.
    best = max(r["val_accuracy"] for r in rows)
    assert f"{100 * best:.2f}%" in card
    image = next((image_folder / "val" / CLASSES[2]).iterdir())
    assert cli.main(["explain", str(image), "--model", str(out), "--json"]) == 0
    explained = json.loads(capsys.readouterr().out)
    assert explained["top"][0]["label"] in CLASSES
    assert (
        cli.main(
            [
                "eval",
                "--data",
                str(csv_folder / "val"),
                "--model",
                str(out),
                "--out",
                str(tmp_path / "ev"),
                "--tasks",
                "intent",
                "--after-block",
                "1",
                "--workers",
                "0",
                "--json",
            ]
        )
        == 0
    )
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["n"] == 3 * PER_CLASS["val"]
    assert abs(evaluated["top1"] - best) < 1e-9  # eval's preprocessing is the one val used


def test_fine_tuning_from_labels_csv_takes_its_names_and_a_timm_folder_stays_timm(csv_folder, tmp_path, capsys):
    folder = save_timm_folder(tiny_timm("deit_tiny_patch16_224"), "deit_tiny_patch16_224", tmp_path / "timm")
    out = tmp_path / "tuned"
    summary = training.train(options(out, data=str(csv_folder), model=f"timm:{folder}"), progress=False)
    assert summary["steps"] == 3  # 18 images, batches of 6
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "deit_tiny_patch16_224" and config["num_classes"] == 3
    bundle = load_model(f"timm:{out}", device="cpu", dtype="float32")
    assert bundle.id2label == {0: "airplane", 1: "automobile", 2: "bird"}
    assert bundle.model.head.out_features == 3


def test_a_small_vit_from_scratch_trains_and_loads(image_folder, tmp_path):
    out = tmp_path / "scratch"
    training.train(
        options(out, data=str(image_folder), init="random", arch="vit-micro", image_size=32, patch_size=4, epochs=2),
        progress=False,
    )
    bundle = load_model(str(out), device="cpu", dtype="float32")
    assert (bundle.patch_size, bundle.input_size, bundle.num_layers) == (4, (32, 32), 2)
    assert len(bundle.id2label) == 3


def test_the_cli_offers_every_preset_and_only_those():
    """--arch's choices are written out (--help imports no torch): they must be the presets the trainer builds."""
    assert train_cli.PRESET_NAMES == tuple(train_models.PRESETS)


class StopAfterFirstCheckpoint(TrainerCallback):
    """Ctrl-C right after epoch 1's checkpoint is written."""

    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_ends(image_folder, tmp_path, capsys):
    """Exactly, with loader worker processes and MixUp: their random draws are seeded per epoch, image and step,
    not taken from a process's running state."""
    settings = dict(
        data=str(image_folder),
        init="random",
        arch="vit-micro",
        image_size=32,
        patch_size=4,
        epochs=3,
        workers=2,
        mixup=0.4,
        command="zoomvit train DATA --out cut",
    )
    whole = training.train(options(tmp_path / "whole", **settings), progress=False)
    out = tmp_path / "cut"
    with pytest.raises(Interrupted) as stopped:
        training.train(options(out, **settings), callbacks=[StopAfterFirstCheckpoint()], progress=False)
    assert stopped.value.code == 130
    assert "checkpoint-3" in capsys.readouterr().err and not (out / "model.safetensors").exists()
    # The same command again is refused; with --resume it goes on from the checkpoint, and says so.
    with pytest.raises(training.ZoomViTError, match="give --resume"):
        training.train(options(out, **settings), progress=False)
    resumed = training.train(
        options(out, resume=True, **{**settings, "command": "zoomvit train DATA --out cut --resume"}), progress=False
    )
    assert f"Resuming from {out / 'checkpoints' / 'checkpoint-3'}: epoch 1/3 done, step 3." in capsys.readouterr().err
    assert resumed["steps"] == whole["steps"] == 9
    rows = json.loads((out / "train_log.json").read_text())
    reference = json.loads((tmp_path / "whole" / "train_log.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert [r[key] for r in rows] == [r[key] for r in reference], key
    weights = load_file(str(out / "model.safetensors"))
    for name, value in load_file(str(tmp_path / "whole" / "model.safetensors")).items():
        assert torch.equal(weights[name], value), name
    # The card speaks for the whole run: every step, and the command that started it.
    card = (out / "README.md").read_text()
    assert "for 9 steps (3 epochs; the whole run, interrupted and resumed 1 time(s))" in card
    assert "zoomvit train DATA --out cut\n" in card and "--out cut --resume" not in card
    with pytest.raises(training.ZoomViTError, match="epochs was 3, now 4"):
        training.train(options(out, resume=True, **{**settings, "epochs": 4}), progress=False)


def test_two_torchrun_processes_train_and_rank_0_alone_writes(image_folder, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "zoomvit",
        "train",
        str(image_folder),
        "--init",
        "random",
        "--arch",
        "vit-micro",
        "--image-size",
        "32",
        "--patch-size",
        "4",
        "--epochs",
        "1",
        "--batch-size",
        "3",
        "--workers",
        "0",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("Saved to") == 1 and done.stderr.count("epoch 1/1:") == 1
    assert "Could not locate the best model" not in done.stderr  # every process restores the weights saved
    state = json.loads(
        sorted((out / "checkpoints").glob("checkpoint-*"))[-1].joinpath("trainer_state.json").read_text()
    )
    assert state["global_step"] == 3  # 18 images over 2 processes x 3 per batch
    bundle = load_model(str(out), device="cpu", dtype="float32")
    assert bundle.id2label == dict(enumerate(CLASSES))
    # The logged losses are the losses, not one per process added up: val's is the saved model's own, recomputed
    # here, and train's is near a fresh 3-class model's ln 3 = 1.1 (twice that when summed over the processes).
    [row] = json.loads((out / "train_log.json").read_text())
    pixels, labels = [], []
    for index, name in enumerate(CLASSES):
        for file in sorted((image_folder / "val" / name).iterdir()):
            with Image.open(file) as image:
                pixels.append(bundle.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"])
            labels.append(index)
    with torch.no_grad():
        logits = bundle.model(torch.cat(pixels)).logits
    val_loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels), label_smoothing=0.1).item()
    assert row["val_loss"] == pytest.approx(val_loss, rel=1e-4)
    assert 0.8 < row["train_loss"] < 1.5


def broken_copy(image_folder, tmp_path, change) -> Path:
    root = tmp_path / "data"
    shutil.copytree(image_folder, root)
    change(root)
    return root


BAD_DATA = {
    "empty class": (lambda r: (r / "train" / "3_cat").mkdir(), "1 empty class folder(s): 3_cat"),
    "one class": (lambda r: [shutil.rmtree(r / "train" / c) for c in CLASSES[1:]], "has one class only (0_airplane)"),
    "val class train lacks": (
        lambda r: shutil.copytree(r / "val" / CLASSES[0], r / "val" / "3_cat"),
        "val folder has 1 class(es) that train lacks: 3_cat",
    ),
    "no val": (lambda r: shutil.rmtree(r / "val"), "has no val/ folder"),
    "renamed class": (
        lambda r: (r / "val" / CLASSES[2]).rename(r / "val" / "2_birds"),
        "Class 2 is '2_bird' in train but '2_birds' in val",
    ),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_line_before_training(case, image_folder, tmp_path, capsys):
    change, message = BAD_DATA[case]
    data = broken_copy(image_folder, tmp_path, change)
    code, err = run_cli(
        data,
        "--init",
        "random",
        "--arch",
        "vit-micro",
        "--image-size",
        "32",
        "--patch-size",
        "4",
        "--out",
        tmp_path / "out",
        capsys=capsys,
    )
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing written before the checks pass


def test_files_that_are_not_images_are_skipped_and_counted(image_folder, tmp_path, capsys):
    def add_junk(root):
        (root / "train" / CLASSES[0] / "notes.txt").write_text("not a picture")
        (root / "train" / CLASSES[1] / "broken.jpg").write_bytes(b"\xff\xd8 truncated")

    data = broken_copy(image_folder, tmp_path, add_junk)
    code, err = run_cli(
        data,
        "--init",
        "random",
        "--arch",
        "vit-micro",
        "--image-size",
        "32",
        "--patch-size",
        "4",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--out",
        tmp_path / "out",
        capsys=capsys,
    )
    assert code == 0, err
    assert "train: skipped 2 file(s) that are not readable images: notes.txt (not an image), broken.jpg" in err
    settings = json.loads((tmp_path / "out" / "train_settings.json").read_text())
    assert settings["images"]["train"] == 3 * PER_CLASS["train"]


BAD_OPTIONS = {
    "epochs": (["--epochs", "0"], "--epochs must be at least 1, got 0."),
    "lr": (["--lr", "2"], "--lr must be in (0, 1), got 2.0."),
    "nan lr": (["--lr", "nan"], "--lr must be in (0, 1), got nan."),
    "warmup": (["--warmup", "1.5"], "--warmup is a share of the steps in [0, 1), got 1.5."),
    "patch": (["--patch-size", "5"], "A 32-px image does not split into 5-px patches"),
    "size for a pretrained model": (
        ["--init", "pretrained", "--model", "x"],
        "--image-size and --patch-size apply to --init random",
    ),
    "fp16 on the cpu": (["--precision", "fp16", "--device", "cpu"], "fp16 trains on a GPU only"),
    "both data and --train": (["--train", "a", "--val", "b"], "not both"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_options_are_one_line(case, image_folder, tmp_path, capsys):
    extra, message = BAD_OPTIONS[case]
    argv = [
        image_folder,
        "--init",
        "random",
        "--arch",
        "vit-micro",
        "--image-size",
        "32",
        "--patch-size",
        "4",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--out",
        tmp_path / "out",
    ]
    code, err = run_cli(*argv, *extra, capsys=capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_an_output_folder_that_is_not_a_run_is_never_emptied(image_folder, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    argv = [
        image_folder,
        "--init",
        "random",
        "--arch",
        "vit-micro",
        "--image-size",
        "32",
        "--patch-size",
        "4",
        "--out",
        out,
    ]
    code, err = run_cli(*argv, capsys=capsys)
    assert code == 2 and "is not empty: give --resume" in err
    code, err = run_cli(*argv, "--overwrite", capsys=capsys)
    assert code == 2 and "is not one" in err and (out / "thesis.tex").read_text() == "precious"
    code, err = run_cli(*argv, "--resume", capsys=capsys)
    assert code == 2 and "Nothing to resume" in err


def test_train_and_val_together_without_validation_save_the_last_epoch(image_folder, tmp_path, capsys):
    out = tmp_path / "final"
    code, err = run_cli(
        "--train",
        image_folder / "train",
        image_folder / "val",
        "--test",
        image_folder / "test",
        "--init",
        "random",
        "--arch",
        "vit-micro",
        "--image-size",
        "32",
        "--patch-size",
        "4",
        "--epochs",
        "2",
        "--workers",
        "0",
        "--out",
        out,
        capsys=capsys,
    )
    assert code == 0, err
    assert "No validation folder" in err and "(last epoch), test top-1" in err
    settings = json.loads((out / "train_settings.json").read_text())
    assert settings["images"] == {"train": 3 * (PER_CLASS["train"] + PER_CLASS["val"]), "test": 3 * PER_CLASS["test"]}
    rows = json.loads((out / "train_log.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["val_accuracy"] is None for r in rows)
    assert "the saved weights are the last epoch's" in (out / "README.md").read_text()
    assert len(load_model(str(out), device="cpu", dtype="float32").id2label) == 3


def test_freeze_keeps_the_stem_and_first_blocks_as_they_were(image_folder, tiny_hf_folder, tmp_path, capsys):
    out = tmp_path / "frozen"
    code, err = run_cli(
        image_folder,
        "--model",
        tiny_hf_folder,
        "--freeze",
        "1",
        "--epochs",
        "1",
        "--warmup",
        "0",
        "--batch-size",
        "6",
        "--workers",
        "0",
        "--out",
        out,
        capsys=capsys,
    )
    assert code == 0, err
    assert "Frozen: the stem and blocks 1..1" in err
    before = ViTForImageClassification.from_pretrained(tiny_hf_folder).state_dict()
    trained = load_file(str(out / "checkpoints" / "checkpoint-3" / "model.safetensors"))  # after the last step
    for name, value in trained.items():
        name = name.removeprefix("model.")
        stem_or_first = "embeddings" in name or ".layers.0." in name
        if "classifier" not in name:
            assert torch.equal(value, before[name]) == stem_or_first, name
    code, err = run_cli(
        image_folder, "--model", tiny_hf_folder, "--freeze", "2", "--out", tmp_path / "x", capsys=capsys
    )
    assert code == 2 and "--freeze must be in 1..1" in err


def test_a_trained_model_is_named_by_its_base_and_data_and_its_card_is_in_about(image_folder, tmp_path):
    """The app names a `zoomvit train` folder by what it is, not by the folder (here the unhelpful "model"), in the
    chooser, the header and the exports, and shows its model card in About."""
    from zoomvit import model_cards
    from zoomvit.app.about import about_text
    from zoomvit.app.model_chooser import header_text
    from zoomvit.app.model_registry import ModelRegistry

    data = tmp_path / "cifar-mini"
    shutil.copytree(image_folder, data)
    out = tmp_path / "model"
    training.train(
        options(out, data=str(data), init="random", arch="vit-micro", image_size=32, patch_size=4, epochs=1),
        progress=False,
    )
    title = "vit-micro trained from scratch on cifar-mini"
    assert model_cards.display_name(str(out)) == title
    registry = ModelRegistry([str(out)], "cpu", "float32", 1, include_cache=False)
    assert registry.choices() == [(title, str(out))]
    bundle = registry.get()
    assert f"**{title}**" in header_text(bundle)
    card = (out / "README.md").read_text(encoding="utf-8")
    about = about_text(bundle)
    assert "This model's card" in about and card.splitlines()[2] in about  # its first line of prose
    assert (
        model_cards.model_card(str(image_folder)) is None and model_cards.display_name("org/some-vit") == "org/some-vit"
    )
