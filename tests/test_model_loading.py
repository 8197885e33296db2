"""load_model on broken, unsafe, unsupported and unreachable models: one ModelLoadError line naming the real cause."""

import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zoomvit.errors import ModelLoadError
from zoomvit.models import load_model

NOT_CACHED = "zoomvit-test/not-a-cached-model"
PHOTO = "data/imagenet-sample/n01440764_tench.JPEG"


@pytest.fixture
def model_folder(tmp_path, deit_model_path):
    """A model folder in tmp_path with DeiT-Tiny's config and preprocessor; weights are up to each test."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(Path(deit_model_path) / name, folder / name)
    return folder


def load_error(folder) -> str:
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder))
    message = str(err.value)
    assert "\n" not in message and str(folder) in message
    assert "local cache" not in message  # the old catch-all reason, wrong for every case here
    return message


def test_truncated_safetensors(model_folder, deit_model_path):
    weights = (Path(deit_model_path) / "model.safetensors").read_bytes()
    (model_folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert "model.safetensors is corrupt or incomplete" in load_error(model_folder)


def test_random_bytes_as_safetensors(model_folder):
    (model_folder / "model.safetensors").write_bytes(os.urandom(4096))
    assert "model.safetensors is corrupt or incomplete" in load_error(model_folder)


class _Payload:
    """Unpickling this creates a file: what a malicious pytorch_model.bin could do, made harmless."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_weights_are_refused_unread(model_folder, tmp_path):
    marker = tmp_path / "unpickled"
    (model_folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    message = load_error(model_folder)
    assert "pickle" in message and "pytorch_model.bin" in message and "save_pretrained" in message
    assert not marker.exists()


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in load_error(tmp_path / "empty")


def test_config_without_weights(model_folder):
    assert "has no weights" in load_error(model_folder)


def test_weights_without_preprocessor(model_folder, deit_model_path):
    (model_folder / "preprocessor_config.json").unlink()
    (model_folder / "model.safetensors").symlink_to(Path(deit_model_path) / "model.safetensors")
    assert "preprocessor_config.json" in load_error(model_folder)


def test_remote_code_is_never_run(model_folder, deit_model_path):
    config = (model_folder / "config.json").read_text()
    auto_map = '"auto_map": {"AutoModelForImageClassification": "modeling_evil.Model"}, '
    (model_folder / "config.json").write_text(config.replace("{", "{" + auto_map, 1))
    (model_folder / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    (model_folder / "model.safetensors").symlink_to(Path(deit_model_path) / "model.safetensors")
    assert "never runs remote code" in load_error(model_folder)


def test_weights_that_do_not_match_the_config(tiny_vit, tmp_path):
    """transformers would fill the missing tensors with random values and only log a warning."""
    import torch
    from safetensors.torch import save_file

    tiny_vit.model.save_pretrained(tmp_path)
    tiny_vit.processor.save_pretrained(tmp_path)
    save_file({"unrelated": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert "weights do not match its config" in load_error(tmp_path)


@pytest.mark.parametrize("family", ["swin", "convnext"])
def test_other_model_families_name_the_supported_ones(tmp_path, family):
    import transformers

    if family == "swin":
        cfg = transformers.SwinConfig(
            image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=2, num_labels=3
        )
        model = transformers.SwinForImageClassification(cfg)
    else:
        cfg = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
        model = transformers.ConvNextForImageClassification(cfg)
    model.save_pretrained(tmp_path)
    message = load_error(tmp_path)
    assert f"'{family}' model" in message and "ViT ('vit'), DeiT ('deit'), ViT-MSN ('vit_msn')" in message


def test_uncached_hub_id_offline_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_model(NOT_CACHED)
    assert str(err.value) == (
        f"Could not load model '{NOT_CACHED}': offline (HF_HUB_OFFLINE is set) and it is not in the local cache; "
        "pass a local folder with --model PATH or ZOOMVIT_MODEL=PATH"
    )


def _zoomvit(shared_dir, tmp_path, model, **env):
    """The installed console script, with an empty hub cache; returns (process, seconds)."""
    script = Path(sys.executable).with_name("zoomvit")
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    environ.update(HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1", **env)
    start = time.monotonic()
    done = subprocess.run(
        [str(script), "explain", str(shared_dir / PHOTO), "--model", model],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
    )
    return done, time.monotonic() - start


def error_lines(done) -> list[str]:
    """stderr but the progress line said before the slow load, when it got that far ("zoomvit: loading model M ...")."""
    lines = done.stderr.splitlines()
    return (
        lines[1:] if lines and lines[0].startswith("zoomvit: loading model ") and lines[0].endswith(" ...") else lines
    )


def assert_one_error_line(done, expected):
    assert done.returncode == 2 and done.stdout == ""
    assert error_lines(done) == [f"zoomvit: error: {expected}"]


def test_cli_corrupt_folder_exits_2_without_traceback(shared_dir, model_folder, tmp_path):
    (model_folder / "model.safetensors").write_bytes(b"\x00" * 100)
    done, _ = _zoomvit(shared_dir, tmp_path, str(model_folder))
    assert done.returncode == 2 and done.stdout == "" and len(error_lines(done)) == 1
    assert error_lines(done)[0].startswith(
        f"zoomvit: error: Could not load model '{model_folder}': model.safetensors is corrupt or incomplete ("
    )


def test_cli_uncached_hub_id_offline(shared_dir, tmp_path):
    done, _ = _zoomvit(shared_dir, tmp_path, NOT_CACHED, HF_HUB_OFFLINE="1")
    assert_one_error_line(
        done,
        f"Could not load model '{NOT_CACHED}': offline (HF_HUB_OFFLINE is set) and it is not in the local "
        "cache; pass a local folder with --model PATH or ZOOMVIT_MODEL=PATH",
    )


def test_cli_uncached_hub_id_with_the_hub_unreachable_fails_fast(shared_dir, tmp_path):
    # Port 9 (discard) has no listener here: the hub's own retries took about 2 minutes on this.
    done, seconds = _zoomvit(shared_dir, tmp_path, NOT_CACHED, HF_ENDPOINT="http://127.0.0.1:9")
    assert_one_error_line(
        done,
        f"Could not load model '{NOT_CACHED}': the Hugging Face hub is unreachable and it is not in the local "
        "cache; pass a local folder with --model PATH or ZOOMVIT_MODEL=PATH",
    )
    assert seconds < 15


# ---- issue 17: inputs that ended in a traceback, and advice never to pass on ----------------------------------------


def test_a_preprocessor_for_another_kind_of_input_is_refused(model_folder, deit_model_path):
    (model_folder / "model.safetensors").symlink_to(Path(deit_model_path) / "model.safetensors")
    whisper = '{"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 80, "sampling_rate": 16000}'
    (model_folder / "preprocessor_config.json").write_text(whisper)
    assert "its preprocessor_config.json describes a 'WhisperFeatureExtractor', " in load_error(model_folder)
    # Named as the image processor type, transformers loads it, and the first image failed deep in the analysis.
    (model_folder / "preprocessor_config.json").write_text(whisper.replace("feature_extractor", "image_processor"))
    assert "describes a 'WhisperFeatureExtractor', not an image processor." in load_error(model_folder)


def test_error_text_never_advises_unpickling():
    from zoomvit.models import _first_line

    timm_says = RuntimeError(
        "weights_only=True blocked loading this checkpoint because it requires non-allowlisted "
        "pickle globals. If this checkpoint is trusted, retry with weights_only=False."
    )
    torch_says = RuntimeError(
        "Weights only load failed. This file can still be loaded, to do so you have two options"
        "\n(1) Re-running `torch.load` with `weights_only` set to `False` will likely succeed"
    )
    for exc in (timm_says, torch_says):
        line = _first_line(exc)
        assert "weights_only" not in line and "weights only" not in line.lower() and "safetensors only" in line


@pytest.mark.parametrize("case", ["whisper preprocessor", "unknown timm tag", "300-character name"])
def test_cli_inputs_that_ended_in_a_traceback_are_one_line(shared_dir, model_folder, deit_model_path, tmp_path, case):
    long_name = "a" * 300
    if case == "whisper preprocessor":
        (model_folder / "model.safetensors").symlink_to(Path(deit_model_path) / "model.safetensors")
        (model_folder / "preprocessor_config.json").write_text('{"feature_extractor_type": "WhisperFeatureExtractor"}')
        model, expected = (
            str(model_folder),
            (
                f"Could not load model '{model_folder}': its preprocessor_config.json describes a "
                "'WhisperFeatureExtractor', which transformers does not know as an image processor."
            ),
        )
    elif case == "unknown timm tag":
        model = "timm:deit_tiny_patch16_224.no_such_tag"
        expected = (
            f"Could not load model '{model}': timm knows no pretrained tag 'no_such_tag' for "
            "deit_tiny_patch16_224 (its tags: fb_in1k)."
        )
    else:
        model, expected = (
            long_name,
            (
                f"Model folder not found, and not a valid hub id either: {'a' * 80}... "
                "(300 characters) (file name too long)"
            ),
        )
    done, _ = _zoomvit(shared_dir, tmp_path, model, HF_HUB_OFFLINE="1")
    assert_one_error_line(done, expected)
