"""Where a model runs and in which precision: the one check of --device / --dtype (and $ZOOMVIT_DEVICE /
$ZOOMVIT_DTYPE) for the library, the app, eval and train."""

import torch

from zoomvit import config
from zoomvit.errors import ZoomViTError


def resolve_device(device=None) -> torch.device:
    """The device named by `device` (None: $ZOOMVIT_DEVICE, else auto): auto, cpu, cuda, cuda:N, mps or a
    torch.device. auto is cuda if torch sees a GPU, else mps if available, else cpu. A device that does not exist
    here is a ZoomViTError, not a failure deep inside the first forward pass."""
    given = str(device) if isinstance(device, torch.device) else config.resolve_device_name(device)
    name = given.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    kind, _, index = name.partition(":")
    if kind not in config.DEVICES[1:] or (index and not (kind == "cuda" and index.isdigit())):
        raise ZoomViTError(
            f"Unknown device '{given}': use auto, cpu, cuda, cuda:N or mps (--device or ${config.DEVICE_ENV_VAR})."
        )
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ZoomViTError(f"Device '{given}' is not available: torch sees no CUDA GPU here; use --device cpu.")
        if index and int(index) >= torch.cuda.device_count():
            raise ZoomViTError(
                f"Device '{given}' does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s), "
                f"cuda:0..cuda:{torch.cuda.device_count() - 1}."
            )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ZoomViTError(f"Device '{given}' is not available: torch sees no Apple GPU (MPS) here; use --device cpu.")
    return torch.device(name)


def resolve_dtype(dtype=None, device=None) -> torch.dtype:
    """The precision named by `dtype` (None: $ZOOMVIT_DTYPE, else float32; or a torch.dtype) for a model on
    `device` (as resolve_device takes it). float16 is refused on the CPU: torch runs it there without half-precision
    hardware (DeiT-Tiny's forward took 5x as long as in float32 on the 2-core dev machine), and it overflows above
    65504 where bfloat16 keeps float32's range. bfloat16 is the CPU's low-precision choice (as slow here, fast on
    CPUs with bfloat16 instructions); float16 is for GPUs."""
    given = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else config.resolve_dtype_name(dtype)
    name = given.strip().lower()
    if name not in config.DTYPES:
        raise ZoomViTError(
            f"Unknown dtype '{given}': use {', '.join(config.DTYPES)} (--dtype or ${config.DTYPE_ENV_VAR})."
        )
    if name == "float16" and resolve_device(device).type == "cpu":
        raise ZoomViTError("float16 runs on a GPU only (cuda or mps); on the CPU use bfloat16 or float32.")
    return getattr(torch, name)
