"""What the `zoomvit` commands share: option errors, the model and device options checked before anything slow,
the one analysis of the image, and the lines and files they write."""

from __future__ import annotations

import sys

from zoomvit.errors import ZoomViTError


class UsageError(ZoomViTError):
    """A bad option value, found before anything heavy is imported."""


def model_facts(model: str):
    """(number of blocks, number of heads, id2label) from the model's config.json, without loading weights; None
    when config.json does not say (a hub id not in the cache, a timm folder): the options are then checked on the
    loaded model."""
    from zoomvit import models

    cfg = models.read_model_config(model)  # also refuses a broken folder or an unsupported model now
    facts = cfg and (cfg.get("num_hidden_layers"), cfg.get("num_attention_heads"), cfg.get("id2label"))
    return (int(facts[0]), int(facts[1]), facts[2]) if facts and all(facts) else None


def device_and_dtype(args):
    """(device, dtype) from --device and --dtype (or their environment variables), checked before anything slow."""
    from zoomvit import devices

    device = devices.resolve_device(args.device)
    return device, devices.resolve_dtype(args.dtype, device)


def load_bundle(model: str, placement):
    from transformers.utils import logging as hf_logging

    from zoomvit import models

    hf_logging.disable_progress_bar()  # keeps stderr to our own messages
    return models.load_model(model, *placement)


def analyze_image(args, check=None):
    """Image first, then the options against config.json, then the model, then the analysis pass: each
    mistake is reported before the slow step after it. `check(num_layers, num_heads, id2label)` validates the
    command's options and returns what they resolve to (on the loaded model when config.json was not at hand)."""
    from zoomvit import images
    from zoomvit.geometry import small_image_note
    from zoomvit.vit_analyzer import analyze

    placement = device_and_dtype(args)
    loaded = images.load_image(args.image)
    facts = model_facts(args.model)
    resolved = check(*facts) if check and facts else None
    say(f"loading model {args.model} ...")  # after the quick checks: a mistake there stays the only line
    bundle = load_bundle(args.model, placement)
    if check and not facts:
        resolved = check(bundle.num_layers, bundle.num_heads, bundle.id2label)
    small = small_image_note(bundle, loaded.image.size)
    if small:
        say(f"warning: {small}")
    say(f"analysing {args.image} ...")
    return analyze(bundle, loaded), resolved


def say(text: str) -> None:
    """One line on stderr about what a command is doing while it is slow: stdout stays the result (--json's one
    JSON object)."""
    print(f"zoomvit: {text}", file=sys.stderr, flush=True)


def print_predictions(title, predictions, count=3):
    print(title)
    for p in predictions[:count]:
        print(f"  {p.prob:6.1%}  {p.label}  [{p.index}]")


def save_image(image, path):
    try:
        image.save(path)
    except (OSError, ValueError) as exc:  # missing folder, unknown extension, ...
        raise UsageError(f"Could not write {path}: {exc}") from None
    print(f"wrote {path}", file=sys.stderr)


def note_ignored(options, where: str) -> None:
    """One line on stderr naming the options given that `where` does not read: the command still runs."""
    if options:
        listed = " and ".join([", ".join(options[:-1]), options[-1]] if len(options) > 1 else options)
        print(
            f"zoomvit: note: {listed} {'does' if len(options) == 1 else 'do'} not apply to {where}; ignored.",
            file=sys.stderr,
        )


def model_json(bundle) -> dict:
    return {
        "name": bundle.name,
        "family": bundle.adapter.describe(),
        "device": str(bundle.device),
        "dtype": bundle.dtype_name,
    }
