"""Per-session state of the web app: each user's cached analysis, and the store that makes one (one model run)
or finds it again.

Each session keeps its `Analysis` in a gr.State (Gradio stores the object as is, without copying it); every
other control re-renders from it, on a copy of the image at most DISPLAY_SIDE pixels wide.

Each session also holds which model it chose (`chosen_model`; none: the server's default). The store takes the
models from a `model_registry.ModelRegistry`, which keeps only a few in memory: when one leaves, the sessions'
analyses of it are dropped, and each is made again from the same image the next time that session uses it.
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

from zoomvit import config, intent, models, pruning, visualization
from zoomvit import zoom as zoom_lib
from zoomvit.app.model_registry import ModelRegistry
from zoomvit.checks import check_after_block, head_index, layer_index
from zoomvit.errors import ZoomViTError
from zoomvit.geometry import Geometry
from zoomvit.images import load_image, release_memory
from zoomvit.vit_analyzer import Analysis, analyze

DISPLAY_SIDE = 768  # images are drawn at most this many pixels on their longest side
MIN_DISPLAY_SIDE = 256  # ... and tiny images are blown up to this on their shortest side (where the longest allows)
MIN_PANEL_SIDE = 128  # ... and very wide or tall ones keep this on their shortest side (full screen, download)
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
    _analysis: Analysis | None  # None once its model left memory: see `analysis`
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
    model: str | None = None  # the model it was analysed with, as the registry offers it
    store: "SessionStore | None" = field(default=None, repr=False)

    @property
    def analysis(self) -> Analysis:
        """The cached analysis; after its model left memory, the same image analysed again (one model run)."""
        if self._analysis is None:
            self._analysis = self.store.analyse_again(self)
        return self._analysis

    @property
    def bundle(self) -> models.ViTBundle:
        return self.analysis.bundle

    @property
    def num_layers(self) -> int:
        return self.bundle.num_layers

    @property
    def num_heads(self) -> int:
        return self.bundle.num_heads

    def drop_analysis(self):
        """Let go of the analysis (and with it the model it refers to); what is on screen stays."""
        if self._analysis is not None:
            self._analysis.release_graph()
            self._analysis = None

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
    model: str | None = None  # the session's chosen model


@dataclass(frozen=True)
class ModelChoice:
    """The state of a session that chose a model and has no image analysed with it (yet)."""

    model: str


SESSION_STATES = (Session, FailedImage, ModelChoice)  # what a session's gr.State holds, beside None


def chosen_model(state) -> str | None:
    """The model a session's state says to use; None: the server's default."""
    return getattr(state, "model", None) if isinstance(state, SESSION_STATES) else None


def forget_image(state):
    """A session's state once its image is gone: only its choice of model, if it made one."""
    model = chosen_model(state)
    return None if model is None else ModelChoice(model)


def prune_after_default(num_layers: int) -> int:
    return min(config.PRUNE_AFTER_BLOCK, num_layers - 1)


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
        session.drop_analysis()


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
    """The models (a ModelRegistry; each session uses the one it chose) and the sessions' analyses of them: every
    model run goes through one lock.

    bundle, num_layers, num_heads and prune_after_default are the default model's: the page is laid out for it
    before a session chooses another. Per session, use the session's (`bundle_for`, or the methods' `session`)."""

    def __init__(self, models_: "models.ViTBundle | ModelRegistry"):
        self.registry = models_ if isinstance(models_, ModelRegistry) else ModelRegistry.holding(models_)
        # One model run (and one image decode) at a time. Reentrant: a handler that holds it may find its session's
        # analysis gone with its model (another tab's choice evicted it) and analyse the image again under it.
        self.model_lock = threading.RLock()
        self.graphs = GraphBudget(GRAPHS_KEPT)
        self._sessions = weakref.WeakSet()  # every live Session: a model that leaves memory takes their analyses
        self._sessions_lock = threading.Lock()  # sessions are added while a model leaves (other threads)
        self.registry.on_evict(self._drop_analyses)
        default = self.registry.get()
        self.num_layers = default.num_layers
        self.num_heads = default.num_heads
        self.prune_after_default = prune_after_default(self.num_layers)

    @property
    def bundle(self) -> models.ViTBundle:
        """The default model (loaded again if it left memory)."""
        return self.registry.get()

    def bundle_for(self, state) -> models.ViTBundle:
        """The model a session uses (its choice, else the default), loaded now if it is not in memory."""
        return self.registry.get(chosen_model(state))

    def session_for(self, image, session: Session | None) -> Session:
        """The session's analysis if it is for this image, otherwise a new analysis (one model run) with the
        session's model."""
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
        model = self.registry.offer(chosen_model(session)).name
        loaded, analysis = self._analyse(path, model)
        with self.model_lock:  # the diagnosis classifies the intent map's box (and computes that map on the way)
            diagnosis = intent.diagnose(analysis)
        release_memory()  # the decode's and the pass's freed memory back to the OS, not held by malloc
        display, geometry = visualization.resized_view(
            loaded.image, analysis.geometry, display_side(loaded.image.size), MIN_DISPLAY_SIDE
        )
        session = Session(key, path, analysis, display, geometry, diagnosis, model=model, store=self)
        with self._sessions_lock:
            self._sessions.add(session)
        return session

    def _analyse(self, path: str, model: str):
        """(loaded image, analysis) of the file with the model (loaded first if it is not in memory)."""
        bundle = self.registry.get(model)
        with self.model_lock:  # the decode too: one large image in memory at a time
            loaded = load_image(path)  # clear errors for anything that is not a usable image
            analysis = analyze(bundle, loaded)
        analysis.grad_rollout()  # numpy only; cached, so the first switch to that view is a pure redraw
        self.graphs.add(analysis)
        return loaded, analysis

    def analyse_again(self, session: Session) -> Analysis:
        """A session whose analysis went with its model: the same image and model, so the same display, geometry
        and diagnosis (kept)."""
        if not Path(session.path).is_file():
            raise ZoomViTError("The uploaded file is gone; upload the image again.")
        analysis = self._analyse(session.path, session.model)[1]
        release_memory()
        return analysis

    def _drop_analyses(self, key):
        """A model left memory (registry callback): the sessions' analyses of it go too."""
        with self._sessions_lock:
            sessions = list(self._sessions)
        for session in sessions:
            if self.registry.key(session.model) == key:
                session.drop_analysis()

    def resolve_target(self, session: Session, target) -> int:
        text = "" if target is None else str(target).strip()
        if not text:
            return session.analysis.predicted
        return session.bundle.find_label(text)

    def for_target(self, session: Session, target: int) -> Analysis:
        analysis = session.analysis
        if target == analysis.target:
            return analysis
        with self.model_lock:  # a backward pass (or a forward + backward once the graph was released)
            other = analysis.for_target(target)
        other.grad_rollout(), other.intent()  # both target views cached now: switching between them is a redraw
        return other

    def block_index(self, block, session=None) -> int:
        """Block number -> layer index, for the session's model (none: the default's)."""
        return layer_index(block, self._counts(session)[0])

    def head_index(self, head, session=None):
        return head_index(head, self._counts(session)[1])

    def check_after_block(self, after_block, session=None) -> int:
        num_layers = self._counts(session)[0]
        if after_block in (None, ""):
            return prune_after_default(num_layers)
        return check_after_block(after_block, num_layers)

    def _counts(self, session) -> tuple[int, int]:
        """(blocks, heads) of the session's model; the default's without a session."""
        if session is None:
            return self.num_layers, self.num_heads
        bundle = self.bundle_for(session)
        return bundle.num_layers, bundle.num_heads
