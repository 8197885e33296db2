"""The labelled image folder `zoomvit eval` reads, and its images decoded in DataLoader worker processes while the
model runs (workers that die with it, see `die_with_parent`).

The folder is read by `zoomvit.labelled_folders`, as `zoomvit train` reads its folders: the ImageFolder layout
(CLASS_NAME/image.jpg, classes matched to the model's labels by name) or images with a labels.csv (at least
`file,label_index`; with `x0,y0,x1,y1`, the object box, the box metrics are added; `background` and `scale`
columns split the zoom results into groups).
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from zoomvit.errors import ImageLoadError
from zoomvit.images import load_image

# Re-exported: the folder's reader was born here, and eval's callers and tests name it by this module.
from zoomvit.labelled_folders import BOX_COLUMNS, GROUP_COLUMNS, Item, read_labels  # noqa: F401


class Images(Dataset):
    """The items' images, decoded (in DataLoader workers): (index, LoadedImage, None), or (index, None, the error)
    for a file that cannot be read, which is skipped; raised in a worker, the error would end the whole run."""

    def __init__(self, folder: Path, items: list[Item]):
        self.folder, self.items = folder, items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        try:
            return index, load_image(self.folder / self.items[index].file), None
        except ImageLoadError as exc:
            return index, None, str(exc)


def default_workers(world: int = 1) -> int:
    """DataLoader processes per evaluating process: its share of the cores less one for the model, 1 to 4 (a photo
    decodes in milliseconds, the model takes tens to hundreds per image: one worker keeps ahead of it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(1, min(4, cores // world - 1))


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent: int, worker_id: int = 0) -> None:
    """A DataLoader worker_init_fn (bind `parent`, the evaluating process's pid, before the workers start): on
    Linux the worker is killed when the process that started it dies. A killed eval's worker would otherwise live
    on, adopted by PID 1, holding its memory and, under torchrun, the launcher's pipes."""
    if not sys.platform.startswith("linux"):
        return
    # The signal comes when the thread that forked this worker ends: the DataLoader's, the evaluating one.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent and not _alive(parent):  # it died before the prctl call: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def decode_ahead(images: Images, batches, workers: int) -> DataLoader:
    """The batches' images, decoded ahead in `workers` processes that die with this one (see
    `die_with_parent`)."""
    return DataLoader(
        images,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=list,
        worker_init_fn=functools.partial(die_with_parent, os.getpid()),
    )
