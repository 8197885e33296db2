"""Shared fixtures: the real DeiT-Tiny from ../shared, and tiny random models that make engine tests fast."""

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Tests never reach the network; the real model comes from the shared folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# The app's temp-folder sweep runs in the tests: give them a folder of their own, not the machine's /tmp/gradio,
# and one per xdist worker (workers inherit the controller's environment). A Gradio app deletes the files it made
# when it closes, and files of equal content share one path: a module's server closing in one worker deleted what
# the other worker's server had just handed out (a 403 on the client's download, now and then).
_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker or "GRADIO_TEMP_DIR" not in os.environ:
    os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix=f"zoomvit-tests-gradio-{_worker or 'main'}-")

from zoomvit.models import ViTBundle, load_model  # noqa: E402  (after the environment above)

# The models here are small: a second intra-op thread gains little on 2 cores and, when anything else is
# running (a served app, another job), thread contention makes every pass 10-20x slower.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ZOOMVIT_SHARED", REPO.parent / "shared"))
DEIT_TINY = "models/deit-tiny-patch16-224"

TINY_LABELS = 10


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    # Missing data is a broken setup, not a reason to skip: fail with what to do about it.
    if not (SHARED / DEIT_TINY).is_dir() or not (SHARED / "data" / "imagenet-sample").is_dir():
        pytest.fail(
            f"Shared folder not found or incomplete at {SHARED} (needs {DEIT_TINY} and data/imagenet-sample). "
            "Put it beside the repository or set ZOOMVIT_SHARED=/path/to/shared."
        )
    return SHARED


@pytest.fixture(scope="session")
def deit_model_path(shared_dir) -> str:
    return str(shared_dir / DEIT_TINY)


@pytest.fixture(scope="session")
def deit_tiny(deit_model_path) -> ViTBundle:
    # Pinned: the tests compare with float32 CPU references, whatever $ZOOMVIT_DEVICE / $ZOOMVIT_DTYPE say.
    return load_model(deit_model_path, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def deit_tiny_bf16(deit_model_path) -> ViTBundle:
    """The same DeiT-Tiny in bfloat16 (on this CPU about 6x slower than float32: use it on a few images)."""
    return load_model(deit_model_path, device="cpu", dtype="bfloat16")


def _tiny_config(config_cls, image_size):
    # A larger init range than the default 0.02 gives peaked, distinguishable attention in a random model.
    return config_cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=8,
        num_labels=TINY_LABELS,
        initializer_range=0.2,
        attn_implementation="eager",
    )


@pytest.fixture(scope="session")
def tiny_vit() -> ViTBundle:
    """Random ViT on a non-square 32x48 input: a 4x6 patch grid, so rows and columns cannot be confused."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    torch.manual_seed(0)
    cfg = _tiny_config(ViTConfig, (32, 48))
    model = ViTForImageClassification(cfg).eval()
    processor = ViTImageProcessorPil(size={"height": 32, "width": 48})
    return ViTBundle(model, processor, "tiny-vit", 8, (32, 48), 1, dict(cfg.id2label))


@pytest.fixture(scope="session")
def tiny_deit_distilled() -> ViTBundle:
    """Random distilled DeiT (CLS + distillation token) behind a resize-then-centre-crop processor: 6x6 grid."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, DeiTImageProcessorPil

    torch.manual_seed(1)
    cfg = _tiny_config(DeiTConfig, 48)
    model = DeiTForImageClassificationWithTeacher(cfg).eval()
    embeddings = model.base_model.embeddings
    with torch.no_grad():  # DeiT starts these at zero, which would make the two special tokens identical
        for param in (embeddings.cls_token, embeddings.distillation_token, embeddings.position_embeddings):
            param.normal_(std=cfg.initializer_range)
    processor = DeiTImageProcessorPil(size={"height": 56, "width": 56}, crop_size={"height": 48, "width": 48})
    return ViTBundle(model, processor, "tiny-deit-distilled", 8, (48, 48), 2, dict(cfg.id2label))
