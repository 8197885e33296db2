"""What `zoomvit train` writes beside the model: the output folder's rules (refuse a finished run unless --resume
or --overwrite), the per-epoch log (train_log.csv / .json), the curves (train_curves.png), the model card
(README.md) and the settings a --resume must match (train_settings.json)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from zoomvit.errors import ZoomViTError
from zoomvit.model_cards import CARD_FILE, SETTINGS_FILE

SETTINGS = SETTINGS_FILE  # the app reads it too (model_cards: a trained model's name)
# Everything a run writes in its folder (the model in either layout, sharded or not, logs, curves, card, settings,
# checkpoints): what --overwrite removes.
RUN_OUTPUTS = (
    SETTINGS,
    "train_log.csv",
    "train_log.json",
    "train_curves.png",
    CARD_FILE,
    "config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "checkpoints",
)
LOG_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds")


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Interrupted(SystemExit, KeyboardInterrupt):
    """Ctrl-C: one line saying what is saved and how to go on; exit status 130."""

    def __init__(self, out: Path):
        last = last_checkpoint(out)
        where = f"the last checkpoint is {last}" if last else "no epoch had finished, so no checkpoint was saved"
        say(f"zoomvit: interrupted: {where}; run the same command with --resume to go on.")
        super().__init__(130)


def checkpoints(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    found = folder.glob("checkpoint-*") if folder.is_dir() else []
    complete = (p for p in found if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file())
    return sorted(complete, key=lambda p: int(p.name.split("-")[-1]))


def last_checkpoint(out: Path) -> str | None:
    found = checkpoints(out)
    return str(found[-1]) if found else None


def resumed_from(checkpoint: str, epochs: int) -> dict:
    """Says what a --resume continues from; returns the checkpoint's epoch and step."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    done = {"epoch": int(round(state["epoch"])), "step": state["global_step"]}
    say(f"Resuming from {checkpoint}: epoch {done['epoch']}/{epochs} done, step {done['step']}.")
    return done


def prepare_folder(o, data_folders: dict) -> Path:
    """The output folder, checked: a new or empty one; a run of ours with --overwrite (cleared later, by clear_run,
    once every check has passed); the same settings with --resume (continued from its last checkpoint). Never
    inside a folder trained or tested on: the next run would read the run folder as a class."""
    out = Path(o.out)
    for name, folders in data_folders.items():
        for folder in folders:
            if out.resolve().is_relative_to(Path(folder).resolve()):
                raise ZoomViTError(f"--out {out} is inside the {name} folder {folder}: write the run elsewhere.")
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 alone checks and writes the folder
        return out
    if out.exists() and not out.is_dir():
        raise ZoomViTError(f"--out {out} is a file, not a folder.")
    held = out.is_dir() and any(out.iterdir())
    ours = (out / SETTINGS).is_file()
    if o.resume and o.overwrite:
        raise ZoomViTError("--resume continues a run and --overwrite starts again: give one of them.")
    if o.resume:
        if not ours:
            raise ZoomViTError(f"Nothing to resume in {out}: it holds no run of `zoomvit train` ({SETTINGS}).")
        saved = json.loads((out / SETTINGS).read_text(encoding="utf-8"))["settings"]
        changed = [k for k, v in o.settings().items() if saved.get(k) != v]
        if changed:
            k = changed[0]
            raise ZoomViTError(
                f"--resume needs the run's own settings: {k} was {saved.get(k)!r}, now {getattr(o, k)!r}."
            )
        if not last_checkpoint(out):
            raise ZoomViTError(
                f"Nothing to resume in {out}: no epoch had finished (no checkpoint); start again with --overwrite."
            )
        return out
    if held and not o.overwrite:
        raise ZoomViTError(
            f"{out} is not empty: give --resume to continue its run, --overwrite to replace it, or another --out."
        )
    if held and not ours:
        raise ZoomViTError(
            f"--overwrite replaces only a folder that `zoomvit train` wrote ({SETTINGS} in it); {out} is not one."
        )
    return out


def clear_run(out: Path) -> None:
    """What an earlier run wrote in `out`, and nothing else: files a user put there stay."""
    for pattern in RUN_OUTPUTS:
        for path in out.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def write_settings(out: Path, o, built, splits) -> None:
    """What a --resume must match, and the command that started the run (a --resume keeps it: the model card
    names the command that made the model, and counts the resumes)."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {name: len(split.files) for name, split in splits.items()}
    record = {"settings": o.settings(), "base": built.base, "family": built.family, "images": counts}
    earlier = json.loads((out / SETTINGS).read_text(encoding="utf-8")) if o.resume else {}
    record["command"] = earlier.get("command", o.command)
    record["resumes"] = earlier.get("resumes", 0) + (1 if o.resume else 0)
    (out / SETTINGS).write_text(json.dumps(record, indent=1), encoding="utf-8")


@contextlib.contextmanager
def weight_bars(show: bool):
    """transformers' own bars (loading and saving weights) shown or not like the Trainer's, then put back."""
    from transformers.utils import logging as hf_logging

    was_shown = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_shown:
            hf_logging.enable_progress_bar()


def quiet_progress(trainer, show: bool) -> None:
    """The Trainer's bars (with ETA) stay; its dict of numbers after every log does not: EpochLog prints one line
    per epoch instead."""
    trainer.remove_callback(ProgressCallback)
    if show:
        trainer.add_callback(_BarsOnly)


class _BarsOnly(ProgressCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class EpochLog(TrainerCallback):
    """One row per epoch (train loss and accuracy, val loss and accuracy, learning rate, seconds), written to
    train_log.csv and .json as each epoch ends, and a one-line summary on stderr (rank 0 only)."""

    def __init__(self, out: Path, o, has_val: bool = True):
        self.out, self.epochs, self.has_val = out, o.epochs, has_val
        self.trainer = None
        self.rows = self._earlier_rows() if o.resume else []
        self.train = {}
        self.started = time.perf_counter()

    def _earlier_rows(self) -> list:
        path = self.out / "train_log.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train = {"train_loss": logs["loss"], "learning_rate": logs.get("learning_rate")}
            if not self.has_val:
                self._row(state, {})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_accuracy" in metrics:
            self._row(state, metrics)

    def _row(self, state, metrics: dict) -> None:
        if self.trainer is None:
            return
        train_accuracy = self.trainer.take_train_accuracy()  # every rank: the counts are summed over them
        if not state.is_world_process_zero:
            return
        epoch = int(round(state.epoch or 0))
        row = {
            "epoch": epoch,
            **{k: None for k in LOG_COLUMNS[1:]},
            **self.train,
            "train_accuracy": train_accuracy,
            "val_loss": metrics.get("eval_loss"),
            "val_accuracy": metrics.get("eval_accuracy"),
            "seconds": round(time.perf_counter() - self.started, 1),
        }
        self.rows = [r for r in self.rows if r["epoch"] < epoch] + [row]
        write_log(self.out, self.rows)
        shown = f"{100 * train_accuracy:.1f}%" if train_accuracy is not None else "-"
        val = (
            f"; val loss {row['val_loss']:.3f}, acc {100 * row['val_accuracy']:.1f}%"
            if row["val_accuracy"] is not None
            else ""
        )
        say(
            f"epoch {epoch}/{self.epochs}: train loss {row['train_loss']:.3f}, acc {shown}{val}; "
            f"lr {row['learning_rate'] or 0:.2e}; {row['seconds']:.0f} s"
        )


def write_log(out: Path, rows: list) -> None:
    (out / "train_log.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    with open(out / "train_log.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def best_epoch(rows: list) -> int | None:
    """The epoch the Trainer keeps: the first with the highest val accuracy (a later tie does not replace it)."""
    scored = [r for r in rows if r.get("val_accuracy") is not None]
    return max(scored, key=lambda r: r["val_accuracy"])["epoch"] if scored else None


def curves_figure(rows: list):
    """Loss and accuracy per epoch, on whole-epoch ticks, the best val epoch (the one saved) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    best = best_epoch(rows)
    fig, (loss, accuracy) = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in ((loss, "loss", "Loss"), (accuracy, "accuracy", "Top-1 accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [r[f"{split}_{key}"] for r in rows]
            if any(v is not None for v in values):
                ax.plot(epochs, [float("nan") if v is None else v for v in values], style, label=split, markersize=3)
        if best is not None:
            ax.axvline(best, color="tab:red", linestyle="--", linewidth=1, label=f"best val (epoch {best}, saved)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_curves(out: Path, rows: list) -> None:
    import matplotlib.pyplot as plt

    fig = curves_figure(rows)
    fig.savefig(out / "train_curves.png", dpi=110)
    plt.close(fig)


def _folders(split) -> str:
    return ", ".join(str(f) for f in split.folders)


def finish(out: Path, o, built, splits, summary: dict, rows: list) -> None:
    """The curves and the model card, once the best epoch is saved."""
    plot_curves(out, rows)
    best = summary["best_val_accuracy"]
    lines = [
        f"# {Path(out).name}",
        "",
        f"Image classifier trained with `zoomvit train` (ZoomViT Explorer) from {built.base}.",
        "",
        f"- **Data**: {', '.join(f'{name} {len(s.files)} images ({_folders(s)})' for name, s in splits.items())}; "
        f"{len(built.id2label)} classes.",
        f"- **Settings**: {', '.join(f'{k}={v}' for k, v in o.settings().items() if v not in (None, ''))}.",
        f"- **Best val top-1**: {100 * best:.2f}% (the saved weights are that epoch's)."
        if best is not None
        else "- **No validation split**: the saved weights are the last epoch's.",
    ]
    if "test_accuracy" in summary:
        lines.append(f"- **Test top-1**: {100 * summary['test_accuracy']:.2f}% ({len(splits['test'].files)} images).")
    record = json.loads((out / SETTINGS).read_text(encoding="utf-8"))
    resumes = record.get("resumes", 0)
    lines += [
        f"- **Training time**: {summary['train_seconds'] / 60:.1f} min for {summary['steps']} steps "
        f"({summary['epochs']} epochs"
        + (f"; the whole run, interrupted and resumed {resumes} time(s)" if resumes else "")
        + ").",
        "",
        "Made by" + (" (then the same command with --resume)" if resumes else "") + ":",
        "",
        "```",
        record.get("command") or "zoomvit train ...",
        "```",
        "",
        "Per-epoch figures: `train_log.csv`; curves: `train_curves.png`.",
        "",
    ]
    (out / CARD_FILE).write_text("\n".join(line for line in lines if line is not None), encoding="utf-8")
    say(
        f"Saved to {out}"
        + (f": best val top-1 {100 * best:.1f}%" if best is not None else " (last epoch)")
        + (f", test top-1 {100 * summary['test_accuracy']:.1f}%" if "test_accuracy" in summary else "")
        + "."
    )
