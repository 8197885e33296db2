"""timm's VisionTransformer family: the adapter against timm's own forward, the three ways in (`timm:<name or
folder>`, a timm-layout folder through transformers' TimmWrapper, hub `timm/...` ids), timm's preprocessing as
geometry, and the real DeiT-Tiny in timm's layout against its Hugging Face copy."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from zoomvit import backbones, pruning
from zoomvit.errors import ModelLoadError
from zoomvit.geometry import encode
from zoomvit.images import load_image
from zoomvit.models import load_model
from zoomvit.vit_analyzer import MAP_METHODS, analyze, predict, predict_pixels

timm = pytest.importorskip("timm")  # a project dependency: the import fails loudly if it is missing

TINY = dict(embed_dim=48, depth=3, num_heads=3, num_classes=5, img_size=32, patch_size=8)
# name -> (extra build arguments, prefix tokens, what the head reads)
VARIANTS = {
    "deit_tiny_patch16_224": ({}, 1, "the class token"),
    "deit_tiny_distilled_patch16_224": ({}, 2, "both special tokens"),
    "deit3_small_patch16_224": ({}, 1, "the class token"),  # layer scale, positions for patches only
    "vit_medium_patch16_reg4_gap_256": ({}, 4, "the mean of the patches"),  # registers, no class token, fc_norm
    "vit_base_patch16_gap_224": ({}, 0, "the mean of the patches"),  # no prefix token, norm before the mean
    "vit_small_patch14_reg4_dinov2": ({}, 5, "the class token"),  # class token + 4 registers
    "vit_base_patch16_clip_224": ({}, 1, "the class token"),  # norm_pre
    "vit_small_patch16_224": ({"qk_norm": True}, 1, "the class token"),
}


def tiny_timm(name, dynamic=False, seed=0):
    torch.manual_seed(seed)
    extra = VARIANTS[name][0]
    model = timm.create_model(name, pretrained=False, dynamic_img_size=dynamic, **TINY, **extra).eval()
    with torch.no_grad():  # layer scales and prefix tokens start at constants; make them matter
        for key, param in model.named_parameters():
            if "gamma" in key or "token" in key:
                param.normal_()
    return model


@pytest.mark.parametrize("name", VARIANTS)
def test_the_adapter_reproduces_timm(name):
    """Logits at the trained size and at another one (against timm's dynamic-size build), and every eager
    attention probability (timm's non-fused path, read at its attention dropout)."""
    model = tiny_timm(name)
    adapter = backbones.adapter_for(model)
    assert adapter.num_prefix == VARIANTS[name][1] and VARIANTS[name][2] in adapter.describe()
    pixels = torch.randn(2, 3, 32, 32)
    seen = []
    for block in model.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda module, inputs, out: seen.append(inputs[0]))
    with torch.no_grad():
        expected = model(pixels)
        x = adapter.embed(pixels)
        ours = []
        for i in range(adapter.num_layers):
            x, probs = adapter.block(i, x, full_attention=True)
            ours.append(probs)
        assert torch.allclose(adapter.head(x), expected, atol=1e-5)
        for theirs, mine in zip(seen, ours, strict=True):
            assert torch.allclose(theirs, mine, atol=1e-6)
        dynamic = tiny_timm(name, dynamic=True)
        other = torch.randn(1, 3, 48, 24)  # a 6 x 3 grid: timm resamples its position table (antialiased)
        x = adapter.embed(other)
        for i in range(adapter.num_layers):
            x, _ = adapter.block(i, x)
        assert torch.allclose(adapter.head(x), dynamic(other), atol=1e-5)


def test_unsupported_timm_models_say_what_is_supported():
    torch.manual_seed(0)
    map_head = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, **TINY)
    with pytest.raises(ValueError, match="global_pool='map'"):
        backbones.adapter_for(map_head)
    with pytest.raises(ModelLoadError, match="VisionTransformer family"):
        load_model("timm:resnet18")
    with pytest.raises(ModelLoadError, match="unknown timm model"):
        load_model("timm:no_such_model_xyz")


def test_an_uncached_timm_name_fails_at_once_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ModelLoadError, match="deit_small_patch16_224.*offline"):
        load_model("timm:deit_small_patch16_224")


def save_timm_folder(model, name, folder, crop_pct=0.875):
    """A folder in timm's hub layout: config.json (architecture, model_args, pretrained_cfg, label_names) and
    model.safetensors with timm's key names."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model_args = {k: v for k, v in {**TINY, **VARIANTS[name][0]}.items() if k != "num_classes"}
    cfg = {
        "architecture": name,
        "num_classes": TINY["num_classes"],
        "global_pool": model.global_pool,
        "model_args": model_args,
        "label_names": [f"thing {i}" for i in range(TINY["num_classes"])],
        "pretrained_cfg": {
            "input_size": [3, 32, 32],
            "interpolation": "bicubic",
            "crop_pct": crop_pct,
            "crop_mode": "center",
            "mean": [0.5, 0.4, 0.3],
            "std": [0.2, 0.25, 0.3],
            "num_classes": TINY["num_classes"],
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "vit_medium_patch16_reg4_gap_256"])
def test_a_timm_folder_loads_through_timm_and_through_transformers(name, tmp_path):
    """The same folder, two loaders: identical pixels, logits, maps and pruning; every map in [0, 1]; keep 1.0
    reproduces timm's own logits; labels and the family line come from the folder."""
    model = tiny_timm(name, seed=3)
    folder = save_timm_folder(model, name, tmp_path / "tiny-timm")
    by_timm = load_model(f"timm:{folder}")
    by_transformers = load_model(str(folder))
    assert type(by_transformers.model).__name__ == "TimmWrapperForImageClassification"
    image = np.random.default_rng(2).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    analyses = [analyze(bundle, image) for bundle in (by_timm, by_transformers)]
    assert torch.equal(analyses[0].pixel_values, analyses[1].pixel_values)
    with torch.no_grad():
        expected = model(analyses[0].pixel_values).softmax(-1)[0].numpy()
    for bundle, analysis in zip((by_timm, by_transformers), analyses):
        assert bundle.label(4) == "thing 4" and bundle.adapter.family.startswith("timm")
        assert analysis.grid == (4, 4) and np.allclose(analysis.probs, expected, atol=1e-5)
        for method in MAP_METHODS:
            grid_map = analysis.map(method)
            assert np.isfinite(grid_map).all() and 0 <= grid_map.min() and grid_map.max() <= 1
        for mode in pruning.MODES:
            assert np.allclose(pruning.prune(analysis, 1.0, 1, mode, timing_repeats=0).probs_after, expected, atol=1e-4)
    assert np.allclose(analyses[0].map("intent"), analyses[1].map("intent"), atol=1e-6)


@pytest.mark.parametrize("size", [(61, 45), (45, 61), (50, 50), (37, 90), (7, 5)])
def test_timm_preprocessing_geometry_matches_its_pixels(size, tmp_path):
    """The resize and crop the geometry states are the ones timm's transform takes, pixel for pixel (its crop
    offset rounds half to even, unlike Hugging Face's floor)."""
    processor = backbones.TimmPreprocessor(
        {
            "input_size": (3, 32, 32),
            "interpolation": "bicubic",
            "crop_pct": 0.875,
            "crop_mode": "center",
            "mean": (0, 0, 0),
            "std": (1, 1, 1),
        }
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    resized, (left, top, width, height) = processor.resize_and_crop(*size)
    expected = (
        np.asarray(image.resize(resized, Image.Resampling.BICUBIC), dtype=np.float32)[
            top : top + height, left : left + width
        ]
        / 255
    )
    pixels = processor(images=image)["pixel_values"][0].permute(1, 2, 0).numpy()
    assert pixels.shape == expected.shape and np.abs(pixels - expected).max() < 1e-6


def test_timm_refuses_preprocessing_it_cannot_map_back():
    with pytest.raises(ValueError, match="crop mode 'border'"):
        backbones.TimmPreprocessor(
            {
                "input_size": (3, 32, 32),
                "crop_mode": "border",
                "crop_pct": 1.0,
                "interpolation": "bicubic",
                "mean": (0, 0, 0),
                "std": (1, 1, 1),
            }
        )


# ---- the real DeiT-Tiny in timm's layout against its Hugging Face copy ----


@pytest.fixture(scope="module")
def deit_paths(shared_dir, deit_tiny):
    folder = shared_dir / "models" / "deit-tiny-patch16-224-timm"
    return {"hf": deit_tiny, "timm": load_model(f"timm:{folder}"), "wrapper": load_model(str(folder))}


def test_the_real_timm_copy_loads_both_ways(deit_paths):
    for key in ("timm", "wrapper"):
        bundle = deit_paths[key]
        assert bundle.adapter.describe() == (
            "timm VisionTransformer: class token, then patches; the head reads the class token"
        )
        assert (bundle.patch_size, bundle.input_size, bundle.num_layers, bundle.num_heads) == (16, (224, 224), 12, 3)
        assert bundle.processor.data_config["crop_pct"] == 0.875  # the folder's, not timm's registry default 0.9
        assert bundle.label(1) == deit_paths["hf"].label(1)


def test_the_timm_copy_equals_the_hf_copy_on_every_dev_image(deit_paths, shared_dir):
    """Same pixels (the Hugging Face preprocessing) into all three: identical top-1 on the 500 dev images."""
    import csv
    import dataclasses

    folder = shared_dir / "data" / "imagenet-sample"
    with open(folder / "labels.csv", newline="") as f:
        files = [folder / row["file"] for row in csv.DictReader(f)]
    assert len(files) == 500
    hf = deit_paths["hf"]
    others = [dataclasses.replace(deit_paths[k], processor=hf.processor) for k in ("timm", "wrapper")]
    for start in range(0, len(files), 50):
        pixels = torch.cat([encode(hf, load_image(p))[0] for p in files[start : start + 50]])
        reference = predict_pixels(hf, pixels)
        for other in others:
            probs = predict_pixels(other, pixels)
            assert np.array_equal(probs.argmax(1), reference.argmax(1)) and np.abs(probs - reference).max() < 1e-4


def test_the_timm_copy_gives_the_hf_copy_maps(deit_paths, shared_dir):
    import dataclasses

    hf = deit_paths["hf"]
    timm_path = dataclasses.replace(deit_paths["timm"], processor=hf.processor)
    folder = shared_dir / "data" / "imagenet-sample"
    for path in sorted(folder.glob("*.JPEG"))[:6]:
        loaded = load_image(path)
        ref, other = analyze(hf, loaded), analyze(timm_path, loaded)
        for method in ("rollout", "grad_rollout", "intent"):
            assert np.corrcoef(ref.map(method).ravel(), other.map(method).ravel())[0, 1] >= 0.999, (path, method)


def test_the_cli_explains_with_a_timm_model(shared_dir):
    folder = shared_dir / "models" / "deit-tiny-patch16-224-timm"
    image = sorted((shared_dir / "data" / "imagenet-sample").glob("*.JPEG"))[0]
    done = subprocess.run(
        [sys.executable, "-m", "zoomvit", "explain", str(image), "--model", f"timm:{folder}", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["top"][0]["label"] and report["grid"] == [14, 14]
    assert report["model"]["family"].startswith("timm VisionTransformer: class token")


def test_the_app_runs_on_a_timm_model(deit_paths, shared_dir):
    """The served app on timm's own build of DeiT-Tiny: its header names the family and token layout, and explain,
    click-inspect, zoom and prune answer over the API with the library's predictions."""
    from app_server import running_app
    from gradio_client import Client, handle_file

    bundle = deit_paths["timm"]
    path = str(shared_dir / "data" / "imagenet-sample" / "n01440764_tench.JPEG")
    expected = bundle.label(analyze(bundle, path, keep_graph=False).predicted)
    with running_app(bundle) as (demo, url):
        header = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "header")
        assert "Model family: timm VisionTransformer: class token, then patches" in header.value
        client = Client(url, verbose=False)
        _, label, *_ = client.predict(handle_file(path), api_name="/explain")
        assert label["label"] == expected
        _, caption, *_ = client.predict(handle_file(path), 100, 80, api_name="/inspect_patch")
        assert caption
        _, _, before, _, info = client.predict(handle_file(path), "always", api_name="/zoom")
        assert before["label"] == expected and info.startswith("**Zoomed in**")
        _, before, after, stats = client.predict(handle_file(path), 1.0, api_name="/prune")
        assert before["label"] == after["label"] == expected and "197" in stats


def cached_hub_repo(cache, repo, folder):
    """A hub repository as huggingface_hub caches it (refs/main -> snapshots/<commit>/files), from a local folder:
    the hub routes, run offline."""
    commit = "0" * 40
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).symlink_to(folder / name)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)


def test_hub_timm_ids_load_from_the_cache(shared_dir, tmp_path, monkeypatch, deit_paths):
    """`timm/<repo>` (through TimmWrapper) and `timm:<name>` (timm's registry names the same repository) both load
    the real DeiT-Tiny from the hub cache, offline, and predict what the folder predicts."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cached_hub_repo(cache, "timm/deit_tiny_patch16_224.fb_in1k", shared_dir / "models" / "deit-tiny-patch16-224-timm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    image = str(shared_dir / "data" / "imagenet-sample" / "n01440764_tench.JPEG")
    expected = predict(deit_paths["timm"], image)
    for name in ("timm/deit_tiny_patch16_224.fb_in1k", "timm:deit_tiny_patch16_224"):
        bundle = load_model(name)
        assert bundle.adapter.family == "timm VisionTransformer", name
        assert np.allclose(predict(bundle, image), expected, atol=1e-6), name


# ---- issue 17: config.json's model_args must not choose the weights -------------------------------------------------


@pytest.mark.parametrize(
    "key", ["checkpoint_path", "pretrained_cfg_overlay", "pretrained_cfg", "pretrained", "features_only"]
)
@pytest.mark.parametrize("prefix", ["timm:", ""])  # timm itself, and transformers' TimmWrapper, which calls timm too
def test_model_args_that_could_pick_the_weights_are_refused(tmp_path, key, prefix):
    """checkpoint_path made timm load a pickle (torch.save'd weights loaded silently) instead of model.safetensors."""
    name = "deit3_small_patch16_224"
    model = tiny_timm(name)
    folder = save_timm_folder(model, name, tmp_path / "tiny-timm")
    pickled = tmp_path / "other.pth"
    torch.save({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, pickled)
    value = {
        "checkpoint_path": str(pickled),
        "pretrained_cfg_overlay": {"file": str(pickled)},
        "pretrained_cfg": {"file": str(pickled)},
        "pretrained": True,
        "features_only": True,
    }[key]
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_args"][key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as err:
        load_model(f"{prefix}{folder}")
    message = str(err.value)
    assert "\n" not in message and "weights_only" not in message
    assert f"its config.json sets model_args '{key}', which ZoomViT does not pass to timm" in message


@pytest.mark.parametrize(
    "change",
    [
        {"file": "other.pth"},
        {"source": "hf-hub", "hf_hub_id": "someone/else"},
        {"url": "https://x/w.pth"},
        {"custom_load": True},
    ],
)
@pytest.mark.parametrize("prefix", ["timm:", ""])
def test_a_timm_folder_that_names_another_weights_source_is_refused(tmp_path, change, prefix):
    """The folder's pretrained_cfg (a file, a hub source, a url, a custom loader) cannot name other weights than
    model.safetensors: refused in one line (it used to be overridden silently, not what config.json said)."""
    name = "deit3_small_patch16_224"
    folder = save_timm_folder(tiny_timm(name), name, tmp_path / "tiny-timm")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["pretrained_cfg"].update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as err:
        load_model(f"{prefix}{folder}")
    message = str(err.value)
    assert "\n" not in message and "pretrained_cfg names a weights source" in message
    assert message.endswith("ZoomViT loads only the model.safetensors beside config.json.")
