"""Engine speed, measured in one run (not a test): analysis pass vs the library's plain forward+backward, and
pruned vs full latency next to the analytic MACs ratio.

    python benchmarks/bench_engine.py [--model PATH] [--timm-model FOLDER] [--repeats 7] [--device cpu]
                                      [--dtype float32]

Prints medians in milliseconds and their ratios, for the given model, for the timm copy through both of its
loaders (timm itself and transformers' TimmWrapper), and for a randomly initialised ViT-B-shaped model (hidden 768,
12 layers, 12 heads, 224 px, patch 16).
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zoomvit import (
    config,  # noqa: E402
    pruning,  # noqa: E402
)
from zoomvit.devices import resolve_device, resolve_dtype
from zoomvit.geometry import encode
from zoomvit.images import LoadedImage, load_image
from zoomvit.models import ViTBundle, load_model
from zoomvit.pruning import median_ms  # noqa: E402
from zoomvit.vit_analyzer import analyze, predict_pixels  # noqa: E402

SHARED = Path(os.environ.get("ZOOMVIT_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))


def vit_b_shaped(device="cpu", dtype="float32") -> ViTBundle:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    cfg = ViTConfig(num_labels=1000, attn_implementation="eager")
    model = ViTForImageClassification(cfg).eval().to(device, dtype)
    processor = ViTImageProcessor(size={"height": 224, "width": 224})
    return ViTBundle(model, processor, "random ViT-B/16", 16, (224, 224), 1, dict(cfg.id2label), device, dtype)


def plain_forward_backward(model, bundle: ViTBundle, loaded: LoadedImage):
    """What a user would write without this tool: preprocess, default-attention forward, backward a logit."""
    pixel_values = bundle.place(bundle.processor(images=loaded.image, return_tensors="pt")["pixel_values"])
    logits = model(pixel_values)
    logits = logits if isinstance(logits, torch.Tensor) else logits.logits  # timm: a tensor; transformers: output
    logits[0, logits[0].argmax()].backward()
    model.zero_grad(set_to_none=True)


def sdpa_twin(bundle: ViTBundle):
    """The same weights with the library's default attention (SDPA), as a plain user would load them. timm's
    models (and TimmWrapper's) use fused attention whatever we asked for: they are their own twin."""
    if bundle.adapter.family.startswith("timm"):
        return bundle.model
    cfg = type(bundle.model.config).from_dict(bundle.model.config.to_dict())
    cfg._attn_implementation = "sdpa"
    model = type(bundle.model)(cfg).eval()
    model.load_state_dict(bundle.model.state_dict())
    return model.to(bundle.device, bundle.dtype)


def bench(bundle: ViTBundle, image: Image.Image, repeats: int):
    plain_model = sdpa_twin(bundle)
    loaded = load_image(image)
    device = bundle.device
    plain = median_ms(lambda: plain_forward_backward(plain_model, bundle, loaded), repeats, device)
    ours = median_ms(lambda: analyze(bundle, loaded, keep_graph=False), repeats, device)
    print(f"\n== {bundle.name} on {device} in {bundle.dtype_name} ==")
    print(
        f"analysis pass {ours:.1f} ms / plain {type(plain_model).__name__} forward+backward {plain:.1f} ms "
        f"= {ours / plain:.3f}x"
    )
    pixel_values, _ = encode(bundle, loaded)
    for batch in (1, 32):
        x = pixel_values.expand(batch, -1, -1, -1).contiguous()
        reps = repeats if batch == 1 else max(3, repeats // 2)
        full = median_ms(lambda x=x: pruning.forward_pruned(bundle, x, 6, 1.0), reps, device)
        hf = median_ms(lambda x=x: predict_pixels(bundle, x), reps, device)
        print(f"batch {batch}: full {full:.1f} ms (prediction pass {hf:.1f} ms)")
        tokens = (x.shape[-1] // bundle.patch_size) * (x.shape[-2] // bundle.patch_size) + bundle.num_special
        for keep in (0.7, 0.5, 0.3):
            pruned = median_ms(
                lambda x=x, keep=keep: pruning.forward_pruned(bundle, x, 6, keep, None, "merge"), reps, device
            )
            _, after, macs_b, macs_a = pruning.pruned_macs(bundle, tokens, keep, 6, "efficiency", "merge")
            ratio = pruned / full
            print(
                f"  keep {keep}: {tokens}->{after} tokens, pruned {pruned:.1f} ms, latency ratio {ratio:.3f}, "
                f"MACs ratio {macs_a / macs_b:.3f}, difference {ratio - macs_a / macs_b:+.3f}"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "deit-tiny-patch16-224"))
    parser.add_argument(
        "--timm-model",
        default=str(SHARED / "models" / "deit-tiny-patch16-224-timm"),
        help="a folder in timm's hub layout, run through timm and through TimmWrapper ('' skips)",
    )
    parser.add_argument("--image", default=str(SHARED / "data" / "imagenet-sample" / "n01440764_tench.JPEG"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-vit-b", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help=f"{config.DEVICE_HELP} (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help=f"{config.DTYPE_HELP} (default: %(default)s)")
    args = parser.parse_args()
    placement = (args.device, args.dtype)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    image = Image.open(args.image).convert("RGB")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench(load_model(args.model, *placement), image, args.repeats)
    if args.timm_model:
        bench(load_model(f"timm:{args.timm_model}", *placement), image, args.repeats)
        bench(load_model(args.timm_model, *placement), image, args.repeats)
    if not args.skip_vit_b:
        bench(vit_b_shaped(*placement), image, args.repeats)


if __name__ == "__main__":
    main()
