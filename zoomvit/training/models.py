"""The model `zoomvit train` trains: a supported model with a new head for the data's classes, or a small ViT from
a named preset; its augmentation, read from the model's own preprocessing; and the folder it is saved as.

A fine-tuned model is saved in the layout of its base (a Hugging Face folder, or timm's hub layout), so every
command loads it with --model FOLDER (timm:FOLDER for timm's layout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from zoomvit.errors import ZoomViTError

# From-scratch presets: (hidden size, blocks, heads). "tiny" is DeiT-Tiny's shape; "mini" halves its depth and
# "nano" also narrows it to 128 (under half of mini's compute: twice the steps in a CPU budget, which small data
# needs more than width; on the CIFAR-10 subset in 40 min, mini reached 48.7% in 20 epochs); "micro" is for
# checking a pipeline in seconds, not for accuracy.
PRESETS = {"vit-tiny": (192, 12, 3), "vit-mini": (192, 6, 3), "vit-nano": (128, 6, 4), "vit-micro": (32, 2, 2)}
SCRATCH_MEAN_STD = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
CROP_SCALE = (0.35, 1.0)  # RandomResizedCrop's share of the image: milder than ImageNet's 0.08 for small data
RANDAUGMENT = {"num_ops": 2, "magnitude": 9}


@dataclass
class Built:
    model: torch.nn.Module  # what the Trainer trains
    processor: object  # the evaluation preprocessing, saved with the model
    family: str  # "hf" or "timm"
    input_size: tuple[int, int]
    mean: list
    std: list
    base: str  # what it started from, for the model card
    id2label: dict = field(default_factory=dict)
    train_transform: object = None
    eval_transform: object = None
    notes: list = field(default_factory=list)


def check_scratch(arch: str, image_size: int | None, patch_size: int | None) -> None:
    if arch not in PRESETS:
        raise ZoomViTError(f"Unknown --arch '{arch}': use one of {', '.join(PRESETS)}.")
    if image_size is None or patch_size is None:
        raise ZoomViTError("--init random needs --image-size and --patch-size (e.g. 32 and 4 for CIFAR-10).")
    if not 1 <= patch_size <= image_size or image_size > 1024:
        raise ZoomViTError(
            f"--patch-size must be in 1..--image-size and --image-size at most 1024, got {patch_size} and {image_size}."
        )
    if image_size % patch_size:
        raise ZoomViTError(
            f"A {image_size}-px image does not split into {patch_size}-px patches: "
            "--image-size must be a multiple of --patch-size."
        )


def build(o, id2label: dict) -> Built:
    built = _scratch(o, id2label) if o.init == "random" else _fine_tune(o, id2label)
    built.id2label = id2label
    if o.freeze:
        built.notes.append(freeze(built.model.model, o.freeze))
    built.train_transform = train_transform(built, o.randaugment)
    built.eval_transform = _eval_transform(built.processor)
    return built


def _scratch(o, id2label: dict) -> Built:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    hidden, depth, heads = PRESETS[o.arch]
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=o.image_size,
        patch_size=o.patch_size,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
    )
    torch.manual_seed(o.seed)
    model = ViTForImageClassification(config)
    mean, std = SCRATCH_MEAN_STD
    processor = ViTImageProcessor(
        do_resize=True, size={"height": o.image_size, "width": o.image_size}, image_mean=mean, image_std=std
    )
    return Built(
        LogitsOnly(model),
        processor,
        "hf",
        (o.image_size, o.image_size),
        mean,
        std,
        f"{o.arch} from scratch ({depth} blocks, width {hidden}, {heads} heads, patch {o.patch_size})",
    )


def _fine_tune(o, id2label: dict) -> Built:
    from zoomvit import models

    bundle = models.load_model(o.model, device="cpu", dtype="float32")  # every check of a model to explain
    old = len(bundle.id2label)
    note = (
        f"The model's {old}-class head is replaced by a new {len(id2label)}-class one; the backbone keeps its weights."
    )
    if bundle.name.startswith(models.TIMM_PREFIX):
        model = bundle.model
        model.reset_classifier(len(id2label))
        data = bundle.processor.data_config
        return Built(
            LogitsOnly(model),
            bundle.processor,
            "timm",
            bundle.input_size,
            list(data["mean"]),
            list(data["std"]),
            o.model,
            notes=[note],
        )
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    source, local_only = models.local_source(o.model)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the replaced head is said once, above, not as a table of mismatched sizes
    try:
        model = AutoModelForImageClassification.from_pretrained(
            source,
            num_labels=len(id2label),
            id2label=id2label,
            label2id={n: i for i, n in id2label.items()},
            ignore_mismatched_sizes=True,
            use_safetensors=True,
            attn_implementation="sdpa",
            local_files_only=local_only,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    processor = bundle.processor
    return Built(
        LogitsOnly(model),
        processor,
        "hf",
        bundle.input_size,
        list(processor.image_mean),
        list(processor.image_std),
        o.model,
        notes=[note],
    )


STEM_NAMES = ("embeddings.", "patch_embed", "cls_token", "pos_embed", "reg_token", "dist_token", "norm_pre")


def freeze(model: torch.nn.Module, blocks: int) -> str:
    """Freeze the stem (patch and position embeddings, special tokens) and the first `blocks` blocks: their
    backward pass is skipped, so a step costs less, and fine-tuning on little data moves fewer weights."""
    from zoomvit import backbones

    layers = backbones.adapter_for(model).layers
    if not 1 <= blocks < len(layers):
        raise ZoomViTError(
            f"--freeze must be in 1..{len(layers) - 1} (blocks to freeze; the model has {len(layers)}), got {blocks}."
        )
    frozen = {id(p) for layer in layers[:blocks] for p in layer.parameters()}
    count = 0
    for name, param in model.named_parameters():
        if id(param) in frozen or any(stem in name for stem in STEM_NAMES):
            param.requires_grad_(False)
            count += param.numel()
    total = sum(p.numel() for p in model.parameters())
    return f"Frozen: the stem and blocks 1..{blocks} ({count / total:.0%} of the weights); the rest trains."


class LogitsOnly(torch.nn.Module):
    """Any classifier as the Trainer calls it: keyword pixel_values in, a dict with logits out. A plain module, so
    the Trainer's checkpoints hold its state dict as is: transformers 5 saves a model's checkpoints under its old
    key names and the Trainer's resume and best-model loads read them back without the renaming (strict=False,
    silently random), which this avoids."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, labels=None):
        logits = self.model(pixel_values)
        return {"logits": logits if isinstance(logits, torch.Tensor) else logits.logits}


def train_transform(built: Built, randaugment: bool):
    """Random resized crop to the model's input size and a flip (RandAugment on request), normalised with the
    model's own mean and std."""
    from torchvision.transforms import v2

    steps = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(built.input_size, scale=CROP_SCALE, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if randaugment:
        steps.append(v2.RandAugment(**RANDAUGMENT))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(built.mean, built.std)]
    return v2.Compose(steps)


def _eval_transform(processor):
    """The model's own evaluation preprocessing: the pixels `zoomvit eval` and the app give it."""

    def transform(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    return transform


def mixup(o, num_labels: int):
    """With --mixup, a function mixing a training batch (pixels, hard labels) -> (pixels, soft labels); None
    without. The trainer applies it to training batches only, in the main process: a collator would also mix the
    val and test batches, and would draw from the loader workers' random state, which --resume does not restore."""
    if not o.mixup:
        return None
    from torchvision.transforms import v2

    return v2.MixUp(alpha=o.mixup, num_classes=num_labels)


def save(built: Built, model, out) -> None:
    """The trained model in its base's layout, beside the run's logs."""
    inner = model.model if isinstance(model, LogitsOnly) else model
    if built.family == "timm":
        import timm

        labels = [name for _, name in sorted(built.id2label.items())]
        timm.models.save_for_hf(inner, str(out), model_config={"label_names": labels}, safe_serialization=True)
        # timm records the class count it was built with among model_args too; it is config.json's num_classes
        path = out / "config.json"
        saved = json.loads(path.read_text(encoding="utf-8"))
        saved.get("model_args", {}).pop("num_classes", None)
        path.write_text(json.dumps(saved, indent=2), encoding="utf-8")
        return
    inner.save_pretrained(str(out))
    built.processor.save_pretrained(str(out))
