"""Serving the web app: the port check, the upload guard, the temp-folder janitor and its middleware, a session
of its own for each plain API call, and numpy's thread setting for the server process.

Both the app and the CLI import this module, and the CLI's --help must stay instant: nothing heavy is imported
at module level (Gradio only inside the functions that need it).
"""

import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

from zoomvit import config
from zoomvit.checks import check_port
from zoomvit.errors import ZoomViTError

log = logging.getLogger("zoomvit.app")

# Gradio's temp folder holds every upload and every output image (~150 KB a call). It is kept under this size
# and age (oldest files first), swept after each upload and every SWEEP_PERIOD_S.
TEMP_MAX_BYTES = 512 * 1024 * 1024
TEMP_MAX_AGE_S = 3600
SWEEP_PERIOD_S = 60
NOT_UPLOADED = "This file did not come through this app's upload; upload it again."
NOT_A_FILE = (
    'An image is sent as {"path": ...}, with the path that this server\'s upload route (/gradio_api/upload) answered.'
)


def add_serve_options(parser):
    """The web app's options, one definition for `python app.py` and `zoomvit serve`."""
    parser.add_argument(
        "--model",
        action="append",
        metavar="MODEL",
        help="hub id or local model folder; repeat it to offer several, chosen per browser tab (the first is the "
        "default; supported classifiers in the local Hugging Face cache are offered too) "
        f"(default: ${config.MODEL_ENV_VAR}, else {config.DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--max-models",
        metavar="N",
        help="models held in memory at once, the least recently used dropped first "
        f"(default: ${config.MAX_MODELS_ENV_VAR}, else {config.DEFAULT_MAX_MODELS})",
    )
    parser.add_argument("--device", help=f"{config.DEVICE_HELP} (default: ${config.DEVICE_ENV_VAR}, else auto)")
    parser.add_argument("--dtype", help=f"{config.DTYPE_HELP} (default: ${config.DTYPE_ENV_VAR}, else float32)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 serves every network this machine is on (default: %(default)s)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port to listen on, 1..65535 (default: %(default)s)")
    return parser


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
# The plain HTTP API
# ----------------------------------------------------------------------------------------------------------

CALL_ROUTE = re.compile(r"/gradio_api/call/(v2/)?[^/]+/?$")


def without_session_hash(body: bytes) -> bytes:
    """A /gradio_api/call request's JSON body without its session_hash (any other body as it is)."""
    if b"session_hash" not in body:
        return body
    try:
        request = json.loads(body)
    except ValueError:
        return body  # Gradio answers what it cannot read
    if not isinstance(request, dict) or "session_hash" not in request:
        return body
    del request["session_hash"]
    return json.dumps(request).encode()


class OwnStreamPerCall:
    """ASGI middleware: each request to the plain call route (POST /gradio_api/call/<name>) is a session of its own.

    Gradio streams the answer of GET /gradio_api/call/<name>/<event_id> from the queue of the event's session,
    not of the event: two calls sent with the same session_hash read each other's answers (a tench photo was
    answered 'great white shark', and the other call got a 404). Without a session_hash of its own, Gradio gives
    each call the event id as its session, so a plain call reuses no earlier call's analysis; clients that keep
    a session (gradio_client, the browser) use /queue/join, whose stream names each answer's event."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or not CALL_ROUTE.search(scope.get("path", "")):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = without_session_hash(b"".join(chunks))
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app(dict(scope, headers=headers), replay, send)


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
        for name in (
            "scipy_openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_",
            "openblas_set_num_threads",
        ):
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(1)
                switched = True
                break
    return switched
