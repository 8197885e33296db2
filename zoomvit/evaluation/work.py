"""`zoomvit eval`'s work folder and its processes: pass 1 writes one small file per image into the work folder, so
an interrupted run resumes where it stopped, under the settings it was started with (`open_work`); each file names
its image and the settings and carries a checksum, and a resumed run trusts only the files that match (`Stamps`,
`finished_images`). Processes started by torchrun (`torch.distributed`, see `distributed`) share the image groups
out (`groups_to_do`) and every file in the one shared folder."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from zoomvit import config, faithfulness
from zoomvit.errors import ZoomViTError

WORK_DIR = ".work"  # the CLI's work folder, inside --out; removed once the outputs are written
_RECORD = re.compile(r"(\d+)(\.skipped)?\.pt")  # pass 1's file of the image with that index
# What pass 1's files hold; 2: each image's intent map and zoom box too (the gallery and example sheets draw them).
RECORD_FORMAT = 2


def fingerprint(
    bundle, data: Path, items, limit, keeps, tasks, after_block, batch, zoom_policy=config.ZOOM_POLICY
) -> dict:
    """The settings pass 1's files depend on: resuming under others would mix two runs in one result (the batch
    too: which images share a batch moves results in the last float digits), and what the files hold."""
    listing = json.dumps([[i.file, i.label, i.box, i.groups] for i in items])
    return {
        "model": bundle.name,
        "device": bundle.device.type,
        "dtype": bundle.dtype_name,
        "data": str(data.resolve()),
        "limit": limit,
        "keep": list(keeps),
        "tasks": list(tasks),
        "after_block": after_block,
        "batch": batch,
        "zoom_policy": zoom_policy,
        "faithfulness_steps": faithfulness.STEPS,
        "images": hashlib.sha256(listing.encode()).hexdigest(),
        "format": RECORD_FORMAT,
    }


class Interrupted(SystemExit, KeyboardInterrupt):
    """A Ctrl-C the CLI has reported in its one line: still a KeyboardInterrupt to the caller, and a SystemExit
    (status 130, as a shell gives a process ended by SIGINT) to the interpreter, which then prints no traceback."""


def _write_atomic(path: Path, write) -> None:
    """write(a temporary path), then rename it to `path`: a run killed mid-write leaves no half-written file."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def _record_path(work: Path, index: int, skipped: bool = False) -> Path:
    return work / f"{index:06d}{'.skipped' if skipped else ''}.pt"


def file_hash(path: Path) -> str | None:
    """The SHA-256 of a file's bytes; None for a file that cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class Stamps:
    """What the work file of each image must say about itself: its index, its image (file name and content hash)
    and the run's settings (see `fingerprint`). A file that says anything else is not trusted: a file copied over
    another, one from another run or of an image changed since is redone."""

    def __init__(self, data: Path, items, settings: dict):
        self.data, self.items = Path(data), items
        self.settings = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def __len__(self):
        return len(self.items)

    def __call__(self, index: int) -> dict:
        item = self.items[index]
        return {"index": index, "file": item.file, "image": file_hash(self.data / item.file), "settings": self.settings}


def _digest(meta: dict, payload: bytes) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode() + b"\n" + payload).hexdigest()


def save_record(work: Path, index: int, record: dict, stamp: dict, skipped: bool = False) -> None:
    """The file: one JSON line (`stamp`, whether the image was skipped, and a checksum of that and the record),
    then the record as torch.save writes it."""
    buffer = io.BytesIO()
    torch.save(record, buffer)
    payload = buffer.getvalue()
    meta = {**stamp, "skipped": skipped}
    header = json.dumps({**meta, "sha256": _digest(meta, payload)}).encode() + b"\n"
    _write_atomic(_record_path(work, index, skipped), lambda path: path.write_bytes(header + payload))


class BadRecord(Exception):
    """A work file that is not what pass 1 wrote (the message says why)."""


def read_record(path: Path) -> tuple[dict, dict]:
    """(the file's stamp, its record), checked against the checksum; BadRecord if the file is damaged."""
    try:
        header, payload = path.read_bytes().split(b"\n", 1)
        meta = json.loads(header)
        checksum = meta.pop("sha256")
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as exc:
        raise BadRecord(f"not a work file of this version, or truncated ({type(exc).__name__})") from None
    if _digest(meta, payload) != checksum:
        raise BadRecord("its checksum does not match its contents (edited or damaged)")
    try:
        record = torch.load(io.BytesIO(payload), weights_only=True)  # tensors and plain values only
    except Exception as exc:  # whatever the unpickler says, the file is not to be trusted
        raise BadRecord(f"unreadable ({type(exc).__name__})") from None
    return meta, record


def load_record(work: Path, index: int, skipped: bool = False) -> dict:
    path = _record_path(work, index, skipped)
    try:
        return read_record(path)[1]
    except BadRecord as exc:  # checked when the run started: something changed it during the run
        raise ZoomViTError(f"{path}: {exc}; run again with --resume to redo that image.") from None


def _problem(meta: dict, index: int, skipped: bool, stamps: Stamps) -> str | None:
    """Why a readable work file does not belong to image `index` of this run; None when it does."""
    if meta.get("index") != index or meta.get("skipped") != skipped:
        return f"it was written for image {meta.get('index')} ({meta.get('file')}), not for this file name"
    if index >= len(stamps):
        return "this run has no image with that index"
    expected = stamps(index)
    if meta.get("file") != expected["file"]:
        return f"it was written for {meta.get('file')}, not {expected['file']}"
    if meta.get("settings") != expected["settings"]:
        return "it was written under other settings"
    if meta.get("image") != expected["image"]:
        return f"{expected['file']} has changed since"
    return None


def _distrust(path: Path, reason: str) -> None:
    print(f"zoomvit: warning: {path}: {reason}; that image is analysed again.", file=sys.stderr)
    path.unlink(missing_ok=True)


def finished_images(work: Path, stamps: Stamps | None = None) -> dict[int, bool]:
    """{index: skipped} of the images pass 1 has written a file for. With `stamps`, every file is checked first
    (see `Stamps`, `read_record`): a bad one is named in a warning and removed, so that its image is redone."""
    found = [(m, work / m[0]) for m in map(_RECORD.fullmatch, sorted(os.listdir(work))) if m]
    if stamps is None:
        return {int(m[1]): bool(m[2]) for m, _ in found}
    good = {}  # index: [(skipped, path)]
    for m, path in found:
        index, skipped = int(m[1]), bool(m[2])
        try:
            problem = _problem(read_record(path)[0], index, skipped, stamps)
        except BadRecord as exc:
            problem = str(exc)
        if problem:
            _distrust(path, problem)
        else:
            good.setdefault(index, []).append((skipped, path))
    finished = {}
    for index, files in good.items():
        if len(files) > 1:  # a result and a skipped file: which one is true cannot be told
            for _, path in files:
                _distrust(path, "the image has both a result and a skipped file")
        else:
            finished[index] = files[0][0]
    return finished


def holds_run(work: Path) -> bool:
    """Whether `work` holds a run that has not completed (its settings are written first, see `open_work`)."""
    return (work / "settings.json").is_file()


def refuse_interrupted(work: Path, resume: bool) -> None:
    """An interrupted run in `work` is continued only with `resume`: its hours are not overwritten by a repeated
    command."""
    if holds_run(work) and not resume:
        raise ZoomViTError(
            f"{work} holds an interrupted run: add --resume to continue it, or delete that folder to start afresh."
        )


def open_work(work: Path, settings_now: dict, resume: bool, stamps: Stamps | None = None) -> dict[int, bool]:
    """The images already done in `work` ({index: skipped}; none for a new run, whose settings (see `fingerprint`)
    are written there). A run found there is continued only with `resume` and the same settings: an interrupted
    run's hours are not overwritten by a repeated command, nor mixed with another run's. Its files are checked
    against `stamps` (see `finished_images`)."""
    settings = work / "settings.json"
    write_settings = lambda path: path.write_text(json.dumps(settings_now, indent=1) + "\n")
    if holds_run(work):
        refuse_interrupted(work, resume)
        try:
            stored = json.loads(settings.read_text())
            changed = [key for key, value in settings_now.items() if stored.get(key) != value]
        except (OSError, ValueError, AttributeError):  # every work file names its settings: they are checked
            print(f"zoomvit: warning: {settings}: damaged; written again with this run's settings.", file=sys.stderr)
            _write_atomic(settings, write_settings)
            changed = []
        if changed:
            raise ZoomViTError(
                f"Cannot resume the run in {work}: it was started with other settings "
                f"({', '.join(changed)}); use those, or delete that folder to start afresh."
            )
        return finished_images(work, stamps)
    if work.is_dir() and any(work.iterdir()):
        raise ZoomViTError(f"{work} is not empty and holds no evaluation run: use another output folder.")
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZoomViTError(f"Could not create {work}: {exc}") from None
    _write_atomic(settings, write_settings)
    return {}


_OWN_FILE = re.compile(r"settings\.json|\d+(\.skipped)?\.pt|(settings\.json|\d+(\.skipped)?\.pt)\.\d+\.tmp")


def remove_work(work: Path) -> None:
    """The work folder with the files a run writes there removed (a file of anyone else's is left, and with it
    the folder)."""
    if not work.is_dir():
        return
    for path in work.iterdir():
        if _OWN_FILE.fullmatch(path.name) and path.is_file():
            path.unlink()
    with contextlib.suppress(OSError):
        work.rmdir()


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
