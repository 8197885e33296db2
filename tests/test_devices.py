"""Devices and precisions: --device / --dtype resolution, GPU-aware timing, and the real DeiT-Tiny in bfloat16
against float32 on a few dev images (CPU only: bfloat16 is about 6x slower than float32 on this machine)."""

import csv

import numpy as np
import pytest
import torch

from zoomvit import faithfulness, models, pruning, zoom
from zoomvit.devices import resolve_device, resolve_dtype
from zoomvit.errors import ZoomViTError
from zoomvit.models import load_model
from zoomvit.vit_analyzer import analyze, predict

MAPS = ("rollout", "grad_rollout", "intent")
# The first 6 dev images: bfloat16 gave float32's top-1 on all 6 (top-2 margins 0.12 to 0.82) and map correlations
# of at least 0.9897 (rollout on the tench; 0.977 was the lowest over the first 12 images, intent on the eagle).
BF16_IMAGES = 6
MIN_MAP_CORRELATION = 0.95


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without CUDA or MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.delenv("ZOOMVIT_DEVICE", raising=False)
    monkeypatch.delenv("ZOOMVIT_DTYPE", raising=False)
    return monkeypatch


def fake_cuda(monkeypatch, count=2):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# ---- resolve_device / resolve_dtype --------------------------------------------------------------------------


def test_auto_prefers_cuda_then_mps_then_cpu(no_gpu):
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    no_gpu.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    fake_cuda(no_gpu)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="a GPU is visible")
def test_this_machine_resolves_auto_to_cpu():
    assert resolve_device("auto") == torch.device("cpu")


def test_named_devices(no_gpu):
    assert (
        resolve_device("cpu") == resolve_device(" CPU ") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    )
    fake_cuda(no_gpu, count=2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")


def test_environment_variables_are_the_defaults(no_gpu):
    no_gpu.setenv("ZOOMVIT_DTYPE", "bfloat16")
    assert resolve_dtype(None, "cpu") == torch.bfloat16
    assert resolve_dtype("float32", "cpu") == torch.float32  # an explicit value beats the environment
    no_gpu.setenv("ZOOMVIT_DEVICE", "tpu")
    with pytest.raises(ZoomViTError, match=r"\$ZOOMVIT_DEVICE"):
        resolve_device(None)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda:-1", "cpu:0", "mps:1", "gpu"])
def test_unknown_devices_are_one_clear_line(no_gpu, device):
    with pytest.raises(ZoomViTError) as exc:
        resolve_device(device)
    message = str(exc.value)
    assert message.startswith(f"Unknown device '{device}': use auto, cpu, cuda, cuda:N or mps") and "\n" not in message


def test_devices_this_machine_lacks_are_refused(no_gpu):
    with pytest.raises(ZoomViTError, match=r"Device 'cuda' is not available: torch sees no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ZoomViTError, match=r"Device 'mps' is not available"):
        resolve_device("mps")
    fake_cuda(no_gpu, count=2)
    with pytest.raises(
        ZoomViTError, match=r"Device 'cuda:2' does not exist: torch sees 2 CUDA GPU\(s\), cuda:0..cuda:1"
    ):
        resolve_device("cuda:2")


@pytest.mark.parametrize("dtype", ["float64", "half", "fp32", "int8"])
def test_unknown_dtypes_are_one_clear_line(no_gpu, dtype):
    with pytest.raises(ZoomViTError, match=rf"^Unknown dtype '{dtype}': use float32, bfloat16, float16 "):
        resolve_dtype(dtype, "cpu")


def test_dtypes(no_gpu):
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16


def test_float16_is_refused_on_the_cpu_only(no_gpu):
    with pytest.raises(ZoomViTError, match=r"float16 runs on a GPU only \(cuda or mps\); on the CPU use bfloat16"):
        resolve_dtype("float16", "cpu")
    with pytest.raises(ZoomViTError, match=r"float16 runs on a GPU only"):
        resolve_dtype("float16", None)  # auto is the CPU here
    fake_cuda(no_gpu)
    assert resolve_dtype("float16", "cuda") == torch.float16


def test_load_model_checks_device_and_dtype_before_loading(no_gpu, deit_model_path):
    no_gpu.setattr(models, "read_model_config", lambda *a: pytest.fail("the model was read"))
    with pytest.raises(ZoomViTError, match=r"^Unknown device 'tpu'"):
        load_model(deit_model_path, device="tpu")
    with pytest.raises(ZoomViTError, match=r"^float16 runs on a GPU only"):
        load_model(deit_model_path, device="cpu", dtype="float16")


# ---- timing --------------------------------------------------------------------------------------------------


def test_timed_waits_for_the_gpu_before_and_after(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", str(device))))
    seconds = pruning.timed(lambda: events.append("run"), "cuda:1")
    assert events == [("sync", "cuda:1"), "run", ("sync", "cuda:1")] and seconds >= 0
    events.clear()
    pruning.timed(lambda: events.append("run"), torch.device("cpu"))
    assert events == ["run"]  # nothing to wait for on the CPU


def test_interleaved_timing_warms_up_each_function_once(monkeypatch):
    calls = {"a": 0, "b": 0}
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    runs = pruning.interleaved_ms(
        [lambda: calls.__setitem__("a", calls["a"] + 1), lambda: calls.__setitem__("b", calls["b"] + 1)],
        repeats=3,
        device="cuda",
    )
    assert calls == {"a": 4, "b": 4} and [len(r) for r in runs] == [3, 3]
    assert len(syncs) == 2 * 8  # every call, warm-ups included, is waited for before and after


# ---- the real DeiT-Tiny in bfloat16 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_paths(shared_dir):
    folder = shared_dir / "data" / "imagenet-sample"
    with open(folder / "labels.csv", newline="") as f:
        return [folder / row["file"] for row in list(csv.DictReader(f))[:BF16_IMAGES]]


@pytest.fixture(scope="module")
def pairs(deit_tiny, deit_tiny_bf16, image_paths):
    """(float32 analysis, bfloat16 analysis) per image."""
    return [(analyze(deit_tiny, p), analyze(deit_tiny_bf16, p)) for p in image_paths]


def correlation(a, b) -> float:
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


def test_the_model_is_loaded_in_bfloat16(deit_tiny_bf16):
    assert deit_tiny_bf16.device == torch.device("cpu") and deit_tiny_bf16.dtype == torch.bfloat16
    assert deit_tiny_bf16.dtype_name == "bfloat16"
    assert {p.dtype for p in deit_tiny_bf16.model.parameters()} == {torch.bfloat16}


def test_bfloat16_analysis_returns_float32_numpy(pairs):
    _, low = pairs[0]
    assert low.pixel_values.dtype == torch.bfloat16  # the model's own input
    for name in ("probs", "attentions", "attention_grads", "hidden_states"):
        values = getattr(low, name)
        assert isinstance(values, np.ndarray) and values.dtype == np.float32, name
        assert np.isfinite(values).all(), name
    assert abs(float(low.probs.sum()) - 1) < 1e-5  # a float32 softmax, not a bfloat16 one (3 digits)


def test_bfloat16_keeps_the_top1_and_the_maps(pairs, image_paths):
    for path, (ref, low) in zip(image_paths, pairs):
        assert low.predicted == ref.predicted, path.name
        assert abs(float(low.probs[ref.predicted]) - float(ref.probs[ref.predicted])) < 0.05, path.name
        for method in MAPS:
            heat = low.map(method)
            assert heat.dtype == np.float32 and np.isfinite(heat).all()
            assert heat.min() >= 0 and heat.max() <= 1
            assert correlation(heat, ref.map(method)) >= MIN_MAP_CORRELATION, (path.name, method)


def test_bfloat16_maps_are_not_the_float32_maps(pairs):
    """The comparison above compares two computations: bfloat16 does move the numbers a little."""
    ref, low = pairs[0]
    assert not np.array_equal(low.attentions, ref.attentions)
    assert not np.array_equal(low.map("intent"), ref.map("intent"))


def test_predict_in_bfloat16(deit_tiny, deit_tiny_bf16, image_paths):
    probs = predict(deit_tiny_bf16, image_paths[0])
    assert probs.dtype == np.float32 and abs(float(probs.sum()) - 1) < 1e-5
    assert probs.argmax() == predict(deit_tiny, image_paths[0]).argmax()


@pytest.mark.parametrize(
    "mode, fusion", [("analysis", "drop"), ("efficiency", "merge"), ("efficiency", "fuse"), ("efficiency", "drop")]
)
def test_pruning_in_bfloat16(pairs, mode, fusion):
    for ref, low in pairs[:3]:
        result = pruning.prune(low, 0.5, 6, mode, fusion, timing_repeats=1)
        assert result.probs_after.dtype == np.float32 and np.isfinite(result.probs_after).all()
        assert result.kept_mask.sum() == 98 and np.isfinite(result.latency_after_ms)
        assert result.after[0].index == pruning.prune(ref, 0.5, 6, mode, fusion, timing_repeats=0).after[0].index


def test_forward_pruned_returns_float32_on_the_cpu(deit_tiny_bf16, pairs):
    _, low = pairs[0]
    logits, keep_idx = pruning.forward_pruned(deit_tiny_bf16, low.pixel_values.float(), 6, 0.3, None, "merge")
    assert logits.dtype == torch.float32 and logits.device.type == "cpu" and torch.isfinite(logits).all()
    assert keep_idx.shape == (1, round(0.3 * 196))
    full, _ = pruning.forward_pruned(deit_tiny_bf16, low.pixel_values, 6, 1.0)
    assert int(full.argmax()) == low.predicted


def test_zoom_and_faithfulness_in_bfloat16(pairs):
    ref, low = pairs[0]
    result = zoom.zoom(low, policy="always")
    assert result.probs_crop.dtype == np.float32 and abs(float(result.probs_crop.sum()) - 1) < 1e-5
    assert result.after[0].index == zoom.zoom(ref, policy="always").after[0].index
    deletion, insertion = faithfulness.perturbation_curves(low, low.map("intent"))
    assert np.isfinite(deletion).all() and np.isfinite(insertion).all()
    assert 0 <= deletion.min() and insertion.max() <= 1
