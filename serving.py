"""Serving the web app: the port check, the upload guard, the temp-folder janitor and its middleware, and numpy's
thread setting for the server process.

Both the app and the CLI import this module, and the CLI's --help must stay instant: nothing heavy is imported
at module level (Gradio only inside the functions that need it).
"""

import logging
import os
import socket
import threading
import time
from pathlib import Path

from checks import check_port
from errors import ZoomViTError

log = logging.getLogger("zoomvit.app")

# Gradio's temp folder holds every upload and every output image (~150 KB a call). It is kept under this size
# and age (oldest files first), swept after each upload and every SWEEP_PERIOD_S.
TEMP_MAX_BYTES = 512 * 1024 * 1024
TEMP_MAX_AGE_S = 3600
SWEEP_PERIOD_S = 60
NOT_UPLOADED = "This file did not come through this app's upload; upload it again."


def port_free(host: str, port: int) -> bool:
    """Whether a server can listen on host:port now. SO_REUSEADDR as uvicorn sets it, so only a listening
    socket makes the port busy, not connections of a server that just stopped. A port outside the range is never
    free: getaddrinfo would wrap 99999 round to 34463 and check that one."""
    try:
        check_port(port)
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except (OSError, OverflowError, ZoomViTError):  # in use, an address not on this machine, a port out of range
        return False
    return True


def get_upload_folder() -> str:
    """The folder Gradio's upload route writes to (its temp folder)."""
    from gradio.utils import get_upload_folder as gradio_upload_folder

    return gradio_upload_folder()


# ----------------------------------------------------------------------------------------------------------
# Uploads
# ----------------------------------------------------------------------------------------------------------


def uploaded_file(path, also=()) -> str:
    """`path` if it lies in the folder this server's upload route writes to (or in one of `also`); otherwise
    refused. No URL passes.

    Nothing is looked up before the check, so the answer says nothing about whether a path exists. Shipped
    examples pass: Gradio copies them into the same folder when the app is built.
    """
    import gradio as gr

    if "://" in str(path):
        raise gr.Error(NOT_UPLOADED)
    real = os.path.realpath(str(path))
    for root in (get_upload_folder(), *also):
        folder = os.path.realpath(root)
        if real != folder and os.path.commonpath([folder, real]) == folder:
            return real
    raise gr.Error(NOT_UPLOADED)


# Component tweaks are made on the instances: subclassing a Gradio component makes Gradio write a .pyi stub
# beside this file at import time.


def hand_over_the_file(image, also=()):
    """Make an upload component (a gr.Image) open only files that came through this server's upload, and pass
    their path to our own loader. `also`: folders whose files pass too (the shipped examples).

    Stock gr.Image opens any server path sent as {"path": ...} without Gradio's file marker, and with the marker
    Gradio copies any server path (or fetches any URL) into its cache before the component sees it: both doors
    are closed here. The stock preprocess also opens the file with Pillow first (a broken file fails inside
    Gradio with a bare "Error"); `images.load_image` gives a message that says what is wrong.
    """
    import gradio as gr

    stock_move, stock_async_move = image.move_resource_to_block_cache, image.async_move_resource_to_block_cache

    def preprocess(payload):
        if payload is None:
            return None
        if getattr(payload, "path", None):
            return uploaded_file(payload.path)
        # An inline data: URL: Gradio would decode it whole and save it again before any budget of ours looks
        # at it (a 280 KB 16-bit PNG became 1.6 GB), and it skips the upload size cap. Uploads only.
        raise gr.Error(NOT_UPLOADED)

    def move(path):  # inputs before they reach preprocess; the examples when the app is built
        if path is not None:
            uploaded_file(path, also=also)
        return stock_move(path)

    async def async_move(path):
        if path is not None:
            uploaded_file(path, also=also)
        return await stock_async_move(path)

    image.preprocess = preprocess
    image.move_resource_to_block_cache, image.async_move_resource_to_block_cache = move, async_move
    return image


# ----------------------------------------------------------------------------------------------------------
# The temp folder
# ----------------------------------------------------------------------------------------------------------


class TempJanitor:
    """Keeps Gradio's temp folder under a size and an age, oldest files first.

    Gradio's own sweep runs on a timer and only knows the files of its events: bare posts to the upload route
    stay until it runs. Files Gradio marks to keep (the examples) are never removed.
    """

    def __init__(self, max_bytes: int = TEMP_MAX_BYTES, max_age_s: float = TEMP_MAX_AGE_S):
        self.max_bytes, self.max_age_s = max_bytes, max_age_s
        self.protectors = []  # callables giving paths to keep
        self._lock = threading.Lock()  # one sweep at a time
        self._pending_lock = threading.Lock()
        self._pending = self._again = False
        self._thread = None

    @property
    def folder(self) -> Path:
        return Path(get_upload_folder())

    def sweep(self) -> int:
        """Delete what is over the age, then the oldest until under the size; returns the bytes left."""
        with self._lock:
            keep = set()
            for protector in self.protectors:
                keep.update(os.path.realpath(p) for p in protector())
            files, total = [], 0
            for root, _, names in os.walk(self.folder):
                for name in names:
                    path = os.path.join(root, name)
                    try:
                        stat = os.lstat(path)
                    except OSError:
                        continue
                    total += stat.st_size  # kept files count towards the size too
                    if os.path.realpath(path) not in keep:
                        files.append((stat.st_mtime, stat.st_size, path))
            files.sort()
            cutoff = time.time() - self.max_age_s
            for mtime, size, path in files:
                if mtime >= cutoff and total <= self.max_bytes:
                    break
                try:
                    os.remove(path)
                    total -= size
                except OSError:
                    pass
            self._remove_empty_folders()
            return total

    def _remove_empty_folders(self):
        for root, dirs, files in os.walk(self.folder, topdown=False):
            if root != str(self.folder) and not dirs and not files:
                try:
                    os.rmdir(root)
                except OSError:
                    pass

    def sweep_soon(self):
        """After an upload: sweep in the background. A flood of uploads runs one sweep at a time, and one more
        after it for what arrived meanwhile."""
        with self._pending_lock:
            if self._pending:
                self._again = True
                return
            self._pending, self._again = True, False
        threading.Thread(target=self._sweep_until_settled, daemon=True).start()

    def _sweep_until_settled(self):
        while True:
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - a sweep must never take the server down
                log.exception("temp folder sweep failed")
            with self._pending_lock:
                if not self._again:
                    self._pending = False
                    return
                self._again = False

    def start(self, period_s: float = SWEEP_PERIOD_S):
        if self._thread is None:
            def loop():
                while True:
                    time.sleep(period_s)
                    try:
                        self.sweep()
                    except Exception:  # noqa: BLE001 - a sweep must never take the server down
                        log.exception("temp folder sweep failed")

            self._thread = threading.Thread(target=loop, daemon=True, name="zoomvit-temp-sweep")
            self._thread.start()


JANITOR = TempJanitor()  # one per process: the upload folder is per process too


class SweepAfterUploads:
    """ASGI middleware: each request to the upload route schedules a sweep of the temp folder."""

    def __init__(self, app, janitor: TempJanitor = JANITOR):
        self.app, self.janitor = app, janitor

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)
        if scope.get("type") == "http" and scope.get("path", "").endswith("/upload"):
            self.janitor.sweep_soon()


# ----------------------------------------------------------------------------------------------------------
# The server process
# ----------------------------------------------------------------------------------------------------------


def one_blas_thread() -> bool:
    """Run numpy's OpenBLAS on one thread in this process; True if a loaded OpenBLAS was switched.

    The maps are many small matrix products (197 x 197 for ViT-B). OpenBLAS splits each across all cores,
    and next to model runs and other sessions the threads mostly wait for each other: on 2 busy cores a
    cached view took ~25 ms and a rollout ~200 ms that way, 4 ms and 20 ms on one thread
    (benchmarks/bench_views.py). Uses threadpoolctl when installed, else the same OpenBLAS call it makes.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass
    else:
        return bool(threadpool_limits(1, user_api="blas"))
    import ctypes

    try:
        with open("/proc/self/maps") as maps:  # Linux: the shared libraries loaded in this process
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}
    except OSError:
        return False
    switched = False
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(1)
                switched = True
                break
    return switched
