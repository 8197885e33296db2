"""Does the Trainer behind `zoomvit train` cost speed? Images per second of training steps through it (with the
project's loss and accuracy counting) against a plain PyTorch loop over the same model, batch and data
(AdamW, the same loss), interleaved rounds in one run; prints the medians and the ratio (goal: at least 0.9).

    python benchmarks/bench_train_throughput.py                       # a vit-mini at 32 px (CIFAR-10's setting)
    python benchmarks/bench_train_throughput.py --model ../shared/models/deit-tiny-patch16-224  # 224 px, 102 classes

The data are tensors already in memory, so both sides measure the training step itself, not image decoding.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoomvit.training import models as train_models  # noqa: E402
from zoomvit.training import trainer as training  # noqa: E402


def build(model_name, classes):
    o = training.TrainOptions(
        out="",
        model=model_name,
        init="pretrained" if model_name else "random",
        arch="vit-mini",
        image_size=None if model_name else 32,
        patch_size=None if model_name else 4,
    )
    id2label = {i: f"class {i}" for i in range(classes)}
    built = train_models._fine_tune(o, id2label) if model_name else train_models._scratch(o, id2label)
    return built


def dataset(built, images, classes):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(images, 3, *built.input_size, generator=generator)
    labels = torch.randint(0, classes, (images,), generator=generator)
    return [{"pixel_values": p, "labels": y} for p, y in zip(pixels, labels)]


def plain_loop(model, rows, batch, lr):
    loader = torch.utils.data.DataLoader(rows, batch_size=batch, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, fused=True)  # as the Trainer's
    loss_fn = training.soft_cross_entropy(0.1)
    model.train()
    started = time.perf_counter()
    seen = 0
    for step in loader:
        loss = loss_fn(model(pixel_values=step["pixel_values"]), step["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(step["labels"])
    return seen / (time.perf_counter() - started)


def through_trainer(model, rows, batch, lr, out):
    from torch.utils.data import default_collate
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=1,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        weight_decay=0.05,
        optim="adamw_torch_fused",
        lr_scheduler_type="constant",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_drop_last=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = training._trainer_class()(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=default_collate,
        compute_loss_func=training.soft_cross_entropy(0.1),
    )
    started = time.perf_counter()
    trainer.train()
    return len(rows) // batch * batch / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a model folder to fine-tune (default: vit-mini from scratch at 32 px)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    built = build(a.model, a.classes)
    rows = dataset(built, a.steps * a.batch, a.classes)
    speeds = {"plain loop": [], "Trainer": []}
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        plain_loop(built.model, rows[: 2 * a.batch], a.batch, 1e-4)  # warm-up: first-call allocations
        for _ in range(a.rounds):  # interleaved: a change in machine load hits both sides alike
            speeds["plain loop"].append(plain_loop(built.model, rows, a.batch, 1e-4))
            speeds["Trainer"].append(through_trainer(built.model, rows, a.batch, 1e-4, out))
    print(
        f"model: {built.base}, input {built.input_size}, batch {a.batch}, {a.steps} steps x {a.rounds} rounds, "
        f"{a.threads} threads, torch {torch.__version__}"
    )
    for name, values in speeds.items():
        print(f"{name:>10}: median {statistics.median(values):7.1f} img/s (range {min(values):.1f}..{max(values):.1f})")
    ratio = statistics.median(speeds["Trainer"]) / statistics.median(speeds["plain loop"])
    print(f"Trainer / plain loop: {ratio:.3f} (goal: at least 0.9)")


if __name__ == "__main__":
    main()
