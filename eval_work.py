"""`zoomvit eval`'s work folder and its processes: pass 1 writes one small file per image into the work folder, so
an interrupted run resumes where it stopped, under the settings it was started with (`open_work`); processes
started by torchrun (`torch.distributed`, see `distributed`) share the image groups out (`groups_to_do`) and every
file in the one shared folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

import faithfulness
from errors import ZoomViTError

WORK_DIR = ".work"  # the CLI's work folder, inside --out; removed once the outputs are written
_RECORD = re.compile(r"(\d+)(\.skipped)?\.pt")  # pass 1's file of the image with that index


def fingerprint(bundle, data: Path, items, limit, keeps, tasks, after_block, batch) -> dict:
    """The settings pass 1's files depend on: resuming under others would mix two runs in one result (the batch
    too: which images share a batch moves results in the last float digits)."""
    listing = json.dumps([[i.file, i.label, i.box, i.groups] for i in items])
    return {
        "model": bundle.name, "device": bundle.device.type, "dtype": bundle.dtype_name, "data": str(data.resolve()),
        "limit": limit, "keep": list(keeps), "tasks": list(tasks), "after_block": after_block, "batch": batch,
        "faithfulness_steps": faithfulness.STEPS, "images": hashlib.sha256(listing.encode()).hexdigest(),
    }


def _write_atomic(path: Path, write) -> None:
    """write(a temporary path), then rename it to `path`: a run killed mid-write leaves no half-written file."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def _record_path(work: Path, index: int, skipped: bool = False) -> Path:
    return work / f"{index:06d}{'.skipped' if skipped else ''}.pt"


def save_record(work: Path, index: int, record: dict, skipped: bool = False) -> None:
    _write_atomic(_record_path(work, index, skipped), lambda path: torch.save(record, path))


def load_record(work: Path, index: int, skipped: bool = False) -> dict:
    return torch.load(_record_path(work, index, skipped), weights_only=True)  # tensors and plain values only


def finished_images(work: Path) -> dict[int, bool]:
    """{index: skipped} of the images pass 1 has written a file for."""
    return {int(m[1]): bool(m[2]) for m in map(_RECORD.fullmatch, os.listdir(work)) if m}


def open_work(work: Path, settings_now: dict, resume: bool) -> dict[int, bool]:
    """The images already done in `work` ({index: skipped}; none for a new run, whose settings (see `fingerprint`)
    are written there). A run found there is continued only with `resume` and the same settings: an interrupted
    run's hours are not overwritten by a repeated command, nor mixed with another run's."""
    settings = work / "settings.json"
    if settings.is_file():
        if not resume:
            raise ZoomViTError(f"{work} holds an interrupted run: add --resume to continue it, or delete that folder "
                               "to start afresh.")
        stored = json.loads(settings.read_text())
        changed = [key for key, value in settings_now.items() if stored.get(key) != value]
        if changed:
            raise ZoomViTError(f"Cannot resume the run in {work}: it was started with other settings "
                               f"({', '.join(changed)}); use those, or delete that folder to start afresh.")
        return finished_images(work)
    if work.is_dir() and any(work.iterdir()):
        raise ZoomViTError(f"{work} is not empty and holds no evaluation run: use another output folder.")
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZoomViTError(f"Could not create {work}: {exc}") from None
    _write_atomic(settings, lambda path: path.write_text(json.dumps(settings_now, indent=1) + "\n"))
    return {}


def groups_to_do(count: int, finished, batch: int) -> list[list[int]]:
    """The groups of pass 1 not yet done, each [index, ...]. Groups are fixed runs of `batch` images of the whole
    list, so every image is computed in the same batch whether a run is resumed or split over processes: the
    figures do not depend on how a run was cut up. A group done in part is run again whole."""
    groups = [list(range(start, min(start + batch, count))) for start in range(0, count, batch)]
    return [group for group in groups if not all(i in finished for i in group)]


# ---- torch.distributed ------------------------------------------------------------------------------------


def rank_world() -> tuple[int, int]:
    """(this process's rank, number of processes) in a torch.distributed run; (0, 1) otherwise."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def from_rank0(compute):
    """compute() run by rank 0 alone, its result (or its ZoomViTError) on every rank: one decision about the
    shared work folder, taken before any rank writes to it."""
    rank, world = rank_world()
    result = None
    if rank == 0:
        try:
            result = compute()
        except ZoomViTError as exc:
            result = exc
    if world > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if isinstance(result, ZoomViTError):
        raise result
    return result


_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets and env:// reads


def rank_device(device) -> torch.device:
    """Under torchrun, a GPU without a number is this process's own, cuda:LOCAL_RANK (one GPU per process)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@contextlib.contextmanager
def distributed(device="cpu"):
    """The process group of a torchrun launch for the block (gloo for a model on the CPU, nccl on a CUDA GPU), so
    that `evaluation.evaluate` shares the work out; nothing for a process torchrun did not start."""
    if not all(name in os.environ for name in _TORCHRUN_ENV) or dist.is_initialized():
        yield
        return
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # nccl's collectives run on the current GPU: make it this process's
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()
