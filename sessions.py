"""Per-session state of the web app: each user's cached analysis, and the store that makes one (one model run)
or finds it again.

Each session keeps its `Analysis` in a gr.State (Gradio stores the object as is, without copying it); every
other control re-renders from it, on a copy of the image at most DISPLAY_SIDE pixels wide.
"""

import collections
import hashlib
import math
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

import config
import intent
import models
import pruning
import visualization
import zoom as zoom_lib
from checks import check_after_block, head_index, layer_index
from errors import ZoomViTError
from geometry import Geometry
from images import load_image, release_memory
from vit_analyzer import Analysis, analyze

DISPLAY_SIDE = 768  # images are drawn at most this many pixels on their longest side
MIN_DISPLAY_SIDE = 256  # ... and tiny images are blown up to this on their shortest side (where the longest allows)
MIN_PANEL_SIDE = 128  # ... and very wide or tall ones keep this on their shortest side (their panel scrolls)
MAX_SESSIONS = 32  # sessions whose state the server keeps (oldest dropped first): ~15-70 MB each
SESSION_TTL_S = 2 * 3600  # a session's analysis is dropped after this long without an update
GRAPHS_KEPT = 4  # analyses that keep their autograd graph (a target change then costs only a backward)


@dataclass
class Shown:
    """What the Explore overlay shows now: enough to export it at full resolution."""

    grid_map: np.ndarray
    caption: str
    colormap: str
    alpha: float
    settings: dict
    patch: tuple | None = None


@dataclass(eq=False)
class Session:
    """One user's cached analysis and what the UI drew from it. Lives in a gr.State, never in a global."""

    key: str  # content hash of the image file
    path: str  # the uploaded file it came from (a later event with the same path skips hashing)
    analysis: Analysis
    display: Image.Image  # the working image, at most DISPLAY_SIDE pixels
    geometry: Geometry  # the model's geometry, for `display`'s pixels
    diagnosis: intent.Diagnosis
    label_index: dict = field(default_factory=dict)  # top-k label text (as shown) -> class index
    patch: tuple | None = None  # the clicked patch (row, col), if any
    target_text: str = ""  # the last target class that worked (the dropdown goes back to it after an error)
    shown: Shown | None = None
    zoom_result: zoom_lib.ZoomResult | None = None
    prune_result: pruning.PruneResult | None = None  # the one on screen
    grid_key: tuple | None = None  # the settings the all-heads grid below was drawn with
    grid_image: Image.Image | None = None

    def original_to_display(self, x: float, y: float) -> tuple[float, float]:
        ow, oh = self.analysis.loaded.original_size
        return x * self.display.width / ow, y * self.display.height / oh

    def display_to_original(self, x: float, y: float) -> tuple[float, float]:
        ow, oh = self.analysis.loaded.original_size
        return x * ow / self.display.width, y * oh / self.display.height


@dataclass(frozen=True)
class FailedImage:
    """The state of a session whose image could not be analysed: no analysis, the file and why."""

    path: str
    message: str


class GraphBudget:
    """Keeps the autograd graph only for the newest few analyses (memory); older ones release theirs.

    Holds weak references only: it never keeps a session's analysis alive.
    """

    def __init__(self, size: int):
        self.size = size
        self._refs = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, analysis):
        with self._lock:
            self._refs[id(analysis)] = weakref.ref(analysis)
            while len(self._refs) > self.size:
                _, ref = self._refs.popitem(last=False)
                old = ref()
                if old is not None:
                    old.release_graph()


def release_session(session):
    """gr.State delete callback: free the graph as soon as Gradio drops the session."""
    if isinstance(session, Session):
        session.analysis.release_graph()


def display_side(size) -> int:
    """The longest side an image is drawn at: DISPLAY_SIDE, or more where that would leave its short side under
    MIN_PANEL_SIDE (an 8000x200 strip would be 19 pixels high). Bounded: images.MAX_ASPECT_RATIO."""
    return max(DISPLAY_SIDE, math.ceil(MIN_PANEL_SIDE * max(size) / max(1, min(size))))


def _file_key(path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class SessionStore:
    """One shared model and the sessions' analyses of it: every model run goes through its lock."""

    def __init__(self, bundle: models.ViTBundle):
        self.bundle = bundle
        self.model_lock = threading.Lock()  # one model run (and one image decode) at a time
        self.graphs = GraphBudget(GRAPHS_KEPT)
        self.num_layers = bundle.num_layers
        self.num_heads = bundle.num_heads
        self.prune_after_default = min(config.PRUNE_AFTER_BLOCK, self.num_layers - 1)

    def session_for(self, image, session: Session | None) -> Session:
        """The session's analysis if it is for this image, otherwise a new analysis (one model run)."""
        if image is None or not str(image):
            raise ZoomViTError("No image: upload one on the Explore tab first.")
        path = str(image)
        if isinstance(session, Session) and session.path == path:
            return session  # the same upload (Gradio names an upload by its content)
        if not Path(path).is_file():
            raise ZoomViTError("The uploaded file is gone; upload the image again.")
        if Path(path).stat().st_size == 0:
            raise ZoomViTError("The uploaded file is empty.")
        key = _file_key(path)
        if isinstance(session, Session) and session.key == key:
            session.path = path
            return session
        with self.model_lock:  # the decode too: one large image in memory at a time
            loaded = load_image(path)  # clear errors for anything that is not a usable image
            analysis = analyze(self.bundle, loaded)
            probe = zoom_lib.zoom(analysis, policy="always")
            diagnosis = intent.diagnose(analysis, zoom_result=probe)  # computes the intent map on the way
        analysis.grad_rollout()  # numpy only; cached, so the first switch to that view is a pure redraw
        self.graphs.add(analysis)
        release_memory()  # the decode's and the pass's freed memory back to the OS, not held by malloc
        display, geometry = visualization.resized_view(
            loaded.image, analysis.geometry, display_side(loaded.image.size), MIN_DISPLAY_SIDE
        )
        return Session(key, path, analysis, display, geometry, diagnosis)

    def resolve_target(self, session: Session, target) -> int:
        text = "" if target is None else str(target).strip()
        if not text:
            return session.analysis.predicted
        return self.bundle.find_label(text)

    def for_target(self, session: Session, target: int) -> Analysis:
        analysis = session.analysis
        if target == analysis.target:
            return analysis
        with self.model_lock:  # a backward pass (or a forward + backward once the graph was released)
            other = analysis.for_target(target)
        other.grad_rollout(), other.intent()  # both target views cached now: switching between them is a redraw
        return other

    def block_index(self, block) -> int:
        return layer_index(block, self.num_layers)

    def head_index(self, head):
        return head_index(head, self.num_heads)

    def check_after_block(self, after_block) -> int:
        if after_block in (None, ""):
            return self.prune_after_default
        return check_after_block(after_block, self.num_layers)
