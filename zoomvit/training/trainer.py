"""`zoomvit train`: fine-tune a supported model on a labelled folder, or train a small ViT from scratch, with the
Hugging Face Trainer (accelerate underneath: GPU, bf16/fp16, gradient accumulation, a cosine schedule with warm-up,
a checkpoint every epoch, --resume and torchrun come from it, not from code here).

What is written here is only what the Trainer does not do: the model with its new head (`train_models`), the
folders and their checks (`train_data`), the per-epoch log, curves and model card (`train_outputs`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import default_collate

from zoomvit.errors import ZoomViTError
from zoomvit.training import checkpoints as train_checkpoints
from zoomvit.training import data as train_data
from zoomvit.training import models as train_models
from zoomvit.training import outputs as train_outputs
from zoomvit.training import sampling

CHECKPOINTS = "checkpoints"


@dataclass
class TrainOptions:
    out: str
    data: str | None = None
    train: list | None = None  # folders trained on together (e.g. train and val for a final model)
    val: str | None = None  # None: no per-epoch validation; the last epoch is saved
    test: str | None = None
    model: str | None = None  # a hub id, folder or timm:NAME to fine-tune; None with init="random"
    init: str = "pretrained"  # or "random": train `arch` from scratch
    arch: str = "vit-tiny"
    freeze: int = 0  # blocks frozen from the first (with the stem); 0: all train
    image_size: int | None = None
    patch_size: int | None = None
    epochs: int = 10
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup: float = 0.1  # share of the steps
    label_smoothing: float = 0.1
    randaugment: bool = False
    mixup: float = 0.0  # MixUp's alpha; 0: off
    precision: str = "fp32"
    device: str | None = None
    workers: int = 2
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    command: str = ""  # as typed, for the model card
    extra: dict = field(default_factory=dict)

    def settings(self) -> dict:
        """What decides the result: a --resume must match it."""
        skip = {"out", "resume", "overwrite", "workers", "command", "extra", "device"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def check_options(o: TrainOptions) -> None:
    """Ranges, before anything is read or loaded."""

    def need(ok, message):
        if not ok:
            raise ZoomViTError(message)

    need(o.init in ("pretrained", "random"), f"--init must be pretrained or random, got '{o.init}'.")
    need(
        o.init == "random" or o.model,
        "Fine-tuning needs --model (a hub id, folder or timm:NAME), or use --init random.",
    )
    need(o.init == "pretrained" or not o.model, "--init random trains --arch from scratch: leave --model out.")
    need(
        o.init == "random" or (o.image_size is None and o.patch_size is None),
        "--image-size and --patch-size apply to --init random; a pretrained model trains at its own size.",
    )
    need(o.epochs >= 1, f"--epochs must be at least 1, got {o.epochs}.")
    need(o.batch_size >= 1, f"--batch-size must be at least 1, got {o.batch_size}.")
    need(o.grad_accum >= 1, f"--grad-accum must be at least 1, got {o.grad_accum}.")
    need(math.isfinite(o.lr) and 0 < o.lr < 1, f"--lr must be in (0, 1), got {o.lr}.")
    need(
        math.isfinite(o.weight_decay) and 0 <= o.weight_decay < 1,
        f"--weight-decay must be in [0, 1), got {o.weight_decay}.",
    )
    need(math.isfinite(o.warmup) and 0 <= o.warmup < 1, f"--warmup is a share of the steps in [0, 1), got {o.warmup}.")
    need(
        math.isfinite(o.label_smoothing) and 0 <= o.label_smoothing < 1,
        f"--label-smoothing must be in [0, 1), got {o.label_smoothing}.",
    )
    need(math.isfinite(o.mixup) and 0 <= o.mixup <= 10, f"--mixup (alpha) must be in [0, 10], got {o.mixup}.")
    need(o.precision in ("fp32", "bf16", "fp16"), f"--precision must be fp32, bf16 or fp16, got '{o.precision}'.")
    need(o.freeze >= 0, f"--freeze must be 0 or more, got {o.freeze}.")
    need(o.workers >= 0, f"--workers must be 0 or more, got {o.workers}.")
    if o.init == "random":
        train_models.check_scratch(o.arch, o.image_size, o.patch_size)


def _trainer_class():
    from transformers import Trainer

    class ZoomViTTrainer(Trainer):
        """The Trainer, counting training accuracy as it goes (the Trainer reports only the loss), shuffling and
        mixing from seeds (training.sampling) so a --resume replays the same run, and writing each checkpoint
        whole or not at all (training.checkpoints)."""

        train_correct = 0
        train_seen = 0
        seed = 0
        mix = None  # models.mixup's function, or None
        mixed_in_step = (-1, 0)  # (global step, batches mixed in it): a seed per batch that a --resume replays

        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            if not isinstance(dataset, sampling.SeededDataset):  # its keys carry the epoch: other datasets' do not
                return super()._get_train_sampler(train_dataset)
            return sampling.EpochSampler(len(dataset), self.seed)

        def _save_checkpoint(self, model, trial):
            train_checkpoints.save_atomically(self, super()._save_checkpoint, model, trial)

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            if model.training and self.mix is not None:
                inputs = self._mixed(inputs)
            labels = inputs["labels"]
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            if model.training:
                logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
                hard = labels.argmax(-1) if labels.ndim > 1 else labels  # mixed-up targets: the larger share
                self.train_correct += int((logits.argmax(-1) == hard).sum())
                self.train_seen += int(hard.numel())
            return (loss, outputs) if return_outputs else loss

        def _mixed(self, inputs: dict) -> dict:
            step, count = self.mixed_in_step
            count = count + 1 if step == self.state.global_step else 0
            self.mixed_in_step = (self.state.global_step, count)
            with sampling.seeded(self.seed, "mixup", self.state.global_step, count):
                pixels, labels = self.mix(inputs["pixel_values"], inputs["labels"])
            return {**inputs, "pixel_values": pixels, "labels": labels}

        def take_train_accuracy(self) -> float | None:
            counts = torch.tensor([self.train_correct, self.train_seen], dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(counts)
            self.train_correct = self.train_seen = 0
            return float(counts[0] / counts[1]) if counts[1] else None

    return ZoomViTTrainer


def soft_cross_entropy(label_smoothing: float):
    """The loss for hard labels and for MixUp's soft ones alike (the models' own loss would take soft labels for
    multi-label targets). Given `num_items_in_batch` (the images in the whole optimizer step: every accumulated
    batch, every process), the Trainer expects the sum over this batch divided by it, and multiplies by the number
    of processes itself; a plain mean here was counted once per process and once per accumulated batch."""

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        total = torch.nn.functional.cross_entropy(
            logits.float(), labels, label_smoothing=label_smoothing, reduction="sum"
        )
        return total / (num_items_in_batch if num_items_in_batch is not None else logits.shape[0])

    return loss


def _accuracy(prediction) -> dict:
    logits, labels = prediction.predictions, prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def train(o: TrainOptions, callbacks=(), progress: bool = True) -> dict:
    """Train as `o` says and write the model folder; returns the summary the model card holds. Every user error is
    a one-line ZoomViTError before training starts. Progress bars only on a terminal: redirected to a file, the one
    line per epoch says it all."""
    check_options(o)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the Trainer's notes about file systems and shards are not the user's business
    progress = progress and sys.stderr.isatty()
    with train_outputs.weight_bars(progress):
        return _train(o, callbacks, progress)


def _train(o: TrainOptions, callbacks, progress: bool) -> dict:
    found = train_data.find_splits(o.data, o.train, o.val, o.test)
    out = train_outputs.prepare_folder(o, found)  # refuses an existing run unless --resume or --overwrite
    splits = train_data.read_splits(found)
    id2label, notes = train_data.check_splits(splits)
    built = train_models.build(o, id2label)
    if "val" not in splits:
        notes.append("No validation folder: no val accuracy per epoch, and the last epoch is the one saved.")
    for line in [*notes, *built.notes]:
        train_outputs.say(line)
    datasets = {
        name: train_data.ImageDataset(split, built.eval_transform if name != "train" else built.train_transform)
        for name, split in splits.items()
    }
    datasets["train"] = sampling.SeededDataset(datasets["train"], o.seed)
    args = _training_arguments(o, out, has_val="val" in splits)
    log = train_outputs.EpochLog(out, o, has_val="val" in splits)
    trainer = _trainer_class()(
        model=built.model,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("val"),
        data_collator=default_collate,
        compute_metrics=_accuracy,
        compute_loss_func=soft_cross_entropy(o.label_smoothing),
        callbacks=[log, *callbacks],
    )
    trainer.seed, trainer.mix = o.seed, train_models.mixup(o, len(id2label))
    log.trainer = trainer
    train_outputs.quiet_progress(trainer, progress)
    main = trainer.is_world_process_zero()
    if main:
        if o.overwrite:
            train_outputs.clear_run(out)  # only now: a refused run leaves the old one as it was
        train_outputs.write_settings(out, o, built, splits)
    resume_from = train_outputs.last_checkpoint(out) if o.resume else None
    earlier = train_outputs.resumed_from(resume_from, o.epochs) if resume_from and main else None
    started = time.perf_counter()
    interrupted = False
    try:
        trainer.train(resume_from_checkpoint=resume_from)
        summary = _summary(o, trainer, datasets, log, earlier, time.perf_counter() - started)
        if main:
            train_models.save(built, trainer.model, out)
            train_outputs.finish(out, o, built, splits, summary, log.rows)
    except KeyboardInterrupt:
        interrupted = True
    except (OSError, RuntimeError) as exc:
        if train_checkpoints.disk_full(exc):
            raise train_checkpoints.disk_full_error(out) from None
        raise
    if interrupted:
        # raised here, not in the except block: the Ctrl-C's traceback (holding the loaders' worker processes) is
        # let go now, and the workers stop at once instead of lingering until a garbage collection
        raise train_outputs.Interrupted(out)
    _leave_process_group()
    return summary


def _leave_process_group() -> None:
    """Under torchrun: every process waits until rank 0 has written the run, then leaves the process group. A
    process that exits with the gloo group still open could abort ("terminate called without an active exception",
    exit code -6) and fail the launch."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _summary(o: TrainOptions, trainer, datasets: dict, log, earlier, seconds: float) -> dict:
    """The figures of the whole run (a resumed one counts its earlier parts too), the test accuracy on the weights
    saved (the Trainer has put the best epoch's back)."""
    earlier_seconds = sum(r["seconds"] for r in log.rows if earlier and r["epoch"] <= earlier["epoch"])
    summary = {
        "best_val_accuracy": trainer.state.best_metric,
        "epochs": o.epochs,
        "train_seconds": earlier_seconds + seconds,
        "steps": trainer.state.global_step,
    }
    if "test" in datasets:
        # predict, not evaluate: with persistent workers evaluate() hands back its cached val loader for any
        # dataset, and the "test" figure was the val set's
        result = trainer.predict(datasets["test"], metric_key_prefix="test")
        summary["test_accuracy"] = result.metrics["test_accuracy"]
    return summary


def _training_arguments(o: TrainOptions, out, has_val: bool):
    from transformers import TrainingArguments

    from zoomvit import devices

    device = devices.resolve_device(o.device)
    if o.precision == "fp16" and device.type == "cpu":
        raise ZoomViTError("fp16 trains on a GPU only; on the CPU use bf16 or fp32.")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=o.epochs,
        per_device_train_batch_size=o.batch_size,
        per_device_eval_batch_size=o.batch_size,
        gradient_accumulation_steps=o.grad_accum,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=o.warmup,
        optim="adamw_torch_fused",  # one kernel for all weights: on a busy CPU the per-tensor loop stalls for seconds
        eval_strategy="epoch" if has_val else "no",
        save_strategy="epoch",
        logging_strategy="epoch",
        save_total_limit=2 if has_val else 1,
        load_best_model_at_end=has_val,
        metric_for_best_model="accuracy" if has_val else None,
        greater_is_better=True if has_val else None,
        bf16=o.precision == "bf16",
        fp16=o.precision == "fp16",
        use_cpu=device.type == "cpu",
        ddp_backend=("gloo" if device.type == "cpu" else "nccl") if distributed else None,
        dataloader_num_workers=o.workers,
        # not persistent: idle workers held by a finished trainer take seconds each to stop when it is collected,
        # and with them the Trainer hands its cached val loader to any evaluate() (the test set too)
        dataloader_persistent_workers=False,
        report_to="none",
        seed=o.seed,
        remove_unused_columns=False,
        disable_tqdm=False,
    )
