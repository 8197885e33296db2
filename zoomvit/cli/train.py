"""`zoomvit train`'s options; the work is `training.train`.

    zoomvit train DATA --model MODEL --out DIR            fine-tune (DATA holds train/ and val/, optionally test/)
    zoomvit train --train DIR --val DIR --model MODEL --out DIR
    zoomvit train DATA --init random --arch vit-nano --image-size 32 --patch-size 4 --out DIR

Under torchrun (`torchrun --nproc-per-node 2 -m zoomvit train ...`) each process trains its share; rank 0 alone
writes the folder.
"""

from __future__ import annotations

import argparse
import shlex

from zoomvit import config

PRESET_NAMES = (
    "vit-tiny",
    "vit-mini",
    "vit-nano",
    "vit-micro",
)  # training.models.PRESETS (kept light: --help imports no torch)


def add_parser(commands) -> None:
    p = commands.add_parser(
        "train",
        help="fine-tune a model on a labelled folder, or train a small ViT from scratch",
        description="Fine-tune a model on labelled images (ImageFolder layout SPLIT/CLASS/image.jpg, or a folder "
        "with labels.csv), or train a small ViT from scratch; writes a model folder that every "
        "command loads with --model (timm:FOLDER for timm models).",
    )
    p.add_argument("data", nargs="?", help="folder with train/ and val/ (and optionally test/) inside")
    p.add_argument(
        "--train",
        nargs="+",
        metavar="DIR",
        help="the training images, one folder or several trained on together (instead of DATA)",
    )
    p.add_argument(
        "--val",
        metavar="DIR",
        help="with --train: the validation images; the best epoch on them is the one "
        "saved (without --val, the last epoch)",
    )
    p.add_argument("--test", metavar="DIR", help="with --train: images evaluated once at the end, for the model card")
    p.add_argument("--out", required=True, help="the folder to write (model, train_log.csv, curves, README.md)")
    p.add_argument(
        "--model",
        default=None,
        help=f"hub id, model folder or timm:NAME to fine-tune (default: ${config.MODEL_ENV_VAR} or "
        f"{config.DEFAULT_MODEL}; not with --init random)",
    )
    p.add_argument(
        "--init",
        choices=("pretrained", "random"),
        default="pretrained",
        help="pretrained: fine-tune --model; random: train --arch from scratch (default: %(default)s)",
    )
    p.add_argument(
        "--arch",
        choices=PRESET_NAMES,
        default="vit-tiny",
        help="from-scratch preset: vit-tiny 12 blocks x 192, vit-mini 6 x 192, vit-nano 6 x 128, "
        "vit-micro 2 x 32 "
        "(default: %(default)s)",
    )
    p.add_argument("--image-size", type=int, help="input side for --init random (e.g. 32 for CIFAR-10)")
    p.add_argument("--patch-size", type=int, help="patch side for --init random (e.g. 4 for CIFAR-10)")
    p.add_argument(
        "--freeze",
        type=int,
        default=0,
        metavar="N",
        help="freeze the stem and the first N blocks (faster steps; 0: train everything) (default: %(default)s)",
    )
    p.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="per process (default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate, AdamW (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="(default: %(default)s)")
    p.add_argument(
        "--warmup",
        type=float,
        default=0.1,
        help="share of the steps spent warming up before the cosine decay (default: %(default)s)",
    )
    p.add_argument("--label-smoothing", type=float, default=0.1, help="(default: %(default)s)")
    p.add_argument("--randaugment", action="store_true", help="add RandAugment (2 ops, magnitude 9) to the crop+flip")
    p.add_argument("--mixup", type=float, default=0.0, help="MixUp alpha; 0 is off (default: %(default)s)")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="bf16 or fp16 mixed precision on a GPU (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        default=config.resolve_device_name(),
        help=f"{config.DEVICE_HELP} (default: %(default)s, from ${config.DEVICE_ENV_VAR} or built in)",
    )
    p.add_argument("--workers", type=int, default=2, help="image decoding processes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.set_defaults(run=cmd_train)


def cmd_train(args: argparse.Namespace):
    from zoomvit.training import trainer as training

    model = args.model
    if args.init == "pretrained" and not model:
        model = config.resolve_model_name()
    options = training.TrainOptions(
        out=args.out,
        data=args.data,
        train=args.train,
        val=args.val,
        test=args.test,
        model=model,
        init=args.init,
        arch=args.arch,
        freeze=args.freeze,
        image_size=args.image_size,
        patch_size=args.patch_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        label_smoothing=args.label_smoothing,
        randaugment=args.randaugment,
        mixup=args.mixup,
        precision=args.precision,
        device=args.device,
        workers=args.workers,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite,
        command=shlex.join(["zoomvit", *args.argv]),
    )
    training.train(options)
    return None
