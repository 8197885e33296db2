"""The models the web app serves, and the few of them it holds in memory.

A server offers the models named at start (`--model`, repeatable; the first is the default) and the supported
image classifiers already in the local Hugging Face cache. Each browser session chooses one; `ModelRegistry`
loads a model on first use and keeps at most `max_models` of them (least recently used out first). A model that
a running event uses is pinned (`pinned`): it is never dropped mid-event, only once the event ends. Whoever keeps
results that refer to a model listens with `on_evict` and drops them when the model goes (see sessions.py).

Nothing heavy at import: the CLI reads this module's helpers before torch loads.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from zoomvit import config, model_cards
from zoomvit.checks import check_max_models
from zoomvit.errors import ZoomViTError

log = logging.getLogger("zoomvit.models")

TIMM_PREFIX = "timm:"  # as models.TIMM_PREFIX (models imports torch: not imported here at module level)


def resolve_max_models(explicit=None) -> int:
    """--max-models, else $ZOOMVIT_MAX_MODELS, else the default; a bad value is a one-line ZoomViTError naming
    where it came from."""
    value, name = config.resolve_max_models(explicit)
    return check_max_models(value, name)


def resolved_id(name: str) -> str:
    """The model a name points at: a local folder by its absolute path (two spellings of one folder are one
    model), a hub id as it is; `timm:` names keep their prefix."""
    if name.startswith(TIMM_PREFIX):
        return TIMM_PREFIX + resolved_id(name[len(TIMM_PREFIX) :])
    try:
        local = Path(name).expanduser()
        return str(local.resolve()) if local.is_dir() else name
    except OSError:  # a name too long to be a path: a hub id or nothing (the loader says which)
        return name


def _label(name: str) -> str:
    """How the chooser names a model: a folder `zoomvit train` wrote by its base and data, another folder by its
    own name, a hub id as it is."""
    prefix = TIMM_PREFIX if name.startswith(TIMM_PREFIX) else ""
    return prefix + model_cards.display_name(name[len(prefix) :])


def _is_classifier(cfg: dict) -> bool:
    """Whether a supported family's config.json describes an image classifier (a ViTModel without its head would
    load with a random one, and is refused by the loader)."""
    if "architecture" in cfg and "model_type" not in cfg:  # timm's hub layout
        if not int(cfg.get("num_classes") or 0):
            return False
        import timm

        vits = set(timm.list_models(module="vision_transformer")) | set(timm.list_models(module="deit"))
        return str(cfg["architecture"]).split(".")[0] in vits
    return any(
        str(a).endswith(("ForImageClassification", "ForImageClassificationWithTeacher"))
        for a in cfg.get("architectures") or []
    )


def cached_models() -> list[str]:
    """Hub ids of the models in the local Hugging Face cache that this project can load: a supported family's
    image classifier, with its safetensors weights (and, but in timm's layout, its preprocessing) cached."""
    from huggingface_hub import constants, scan_cache_dir, try_to_load_from_cache

    from zoomvit import models

    try:
        repos = scan_cache_dir(constants.HF_HUB_CACHE).repos
    except Exception:  # no cache folder yet (CacheNotFound), or one that cannot be read: nothing cached
        return []
    found = []
    for repo in sorted(repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        try:
            cfg = models.read_model_config(repo.repo_id)  # refuses other families and remote code
        except ZoomViTError:
            continue
        if not cfg or not _is_classifier(cfg):
            continue

        def cached(file, repo_id=repo.repo_id):
            return isinstance(try_to_load_from_cache(repo_id, file), str)

        timm_layout = "architecture" in cfg and "model_type" not in cfg
        if (cached("model.safetensors") or cached("model.safetensors.index.json")) and (
            timm_layout or cached("preprocessor_config.json")
        ):
            found.append(repo.repo_id)
    return found


@dataclass(frozen=True)
class Offer:
    """One model the server offers: its name as given (a folder, a hub id, timm:...) and how the chooser shows it."""

    name: str
    label: str


class ModelRegistry:
    """The offered models, and the loaded ones (at most `max_models`, least recently used first out), keyed by
    (resolved model id, device, dtype). Thread-safe: one load at a time, under a lock."""

    def __init__(self, names=None, device=None, dtype=None, max_models=None, include_cache: bool = True, loader=None):
        """names: as --model gives them (None or []: $ZOOMVIT_MODEL, else the built-in default); each is checked
        now from its config.json (a broken folder or an unsupported model fails before anything loads), unless a
        `loader` of the caller's own serves them."""
        from zoomvit import devices, models

        self.device = devices.resolve_device(device)
        self.dtype = devices.resolve_dtype(dtype, self.device)
        self.max_models = resolve_max_models(max_models)
        given = [config.resolve_model_name(name) for name in (names or [None])]
        if loader is None:
            for name in given:
                models.read_model_config(name)
        self._loader = loader or models.load_model
        self._offers = {}  # resolved id -> Offer, in the chooser's order
        for name in given + (cached_models() if include_cache else []):
            self._offers.setdefault(resolved_id(name), Offer(name, _label(name)))
        labels = [offer.label for offer in self._offers.values()]
        if len(set(labels)) < len(labels):  # two folders of one name: show them as given
            self._offers = {key: Offer(o.name, o.name) for key, o in self._offers.items()}
        self.default = given[0]
        self._loaded = collections.OrderedDict()  # key -> ViTBundle, least recently used first
        self._pins = collections.Counter()  # key -> events running on that model now
        self._lock = threading.Lock()  # the two tables above
        self._load_lock = threading.Lock()  # one load at a time
        self._listeners = []

    @classmethod
    def holding(cls, bundle) -> ModelRegistry:
        """A registry that serves one model already loaded (the app built on a bundle, as the tests do)."""
        registry = cls([bundle.name], bundle.device, bundle.dtype, 1, include_cache=False, loader=lambda *_: bundle)
        registry.get()
        return registry

    # ---- what is offered ---------------------------------------------------------------------------------
    def choices(self) -> list[tuple[str, str]]:
        """(label, name) of every offered model, the default first: the chooser's entries."""
        return [(offer.label, offer.name) for offer in self._offers.values()]

    def label(self, name: str | None) -> str:
        return self.offer(name).label

    def offer(self, name: str | None) -> Offer:
        """The offered model `name` names (None: the default); a model this server does not offer is refused."""
        name = self.default if name in (None, "") else str(name)
        found = self._offers.get(resolved_id(name))
        if found is None:
            listed = ", ".join(o.label for o in self._offers.values())
            raise ZoomViTError(f"This server does not offer the model '{name}'; choose one of: {listed}.")
        return found

    def key(self, name: str | None) -> tuple[str, str, str]:
        return resolved_id(self.offer(name).name), str(self.device), str(self.dtype).removeprefix("torch.")

    # ---- what is loaded ----------------------------------------------------------------------------------
    def loaded(self) -> list[str]:
        """The names of the models in memory, least recently used first."""
        with self._lock:
            keys = list(self._loaded)
        return [self._offers[key[0]].name for key in keys]

    def on_evict(self, callback):
        """callback(key) runs after a model left memory (outside any lock, never during an event that pinned it)."""
        self._listeners.append(callback)

    def get(self, name: str | None = None):
        """The loaded model (None: the default), loading it now if it is not in memory (a one-line
        ModelLoadError if it cannot be loaded; the models already loaded stay)."""
        key = self.key(name)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
        with self._load_lock:
            with self._lock:  # loaded while this call waited for the load lock
                if key in self._loaded:
                    self._loaded.move_to_end(key)
                    return self._loaded[key]
            offer = self.offer(name)
            log.info("loading model %s", offer.name)
            bundle = self._loader(offer.name, self.device, self.dtype)
            with self._lock:
                self._loaded[key] = bundle
                evicted = self._trim(keep=key)
        self._evicted(evicted)
        return bundle

    @contextlib.contextmanager
    def pinned(self, name: str | None = None):
        """Keep the model `name` (None: the default) in memory while the block runs, and count it as used now.
        A name not offered pins nothing (the handler refuses it with the message)."""
        try:
            key = self.key(name)
        except ZoomViTError:
            yield
            return
        with self._lock:
            self._pins[key] += 1
            if key in self._loaded:
                self._loaded.move_to_end(key)
        try:
            yield
        finally:
            with self._lock:
                self._pins[key] -= 1
                if not self._pins[key]:
                    del self._pins[key]
                evicted = self._trim()
            self._evicted(evicted)

    def _trim(self, keep=None) -> list:
        """Under the lock: take the least recently used unpinned models out until at most max_models remain
        (pinned ones wait for their events to end; `keep`, the one just loaded, stays)."""
        evicted = []
        for key in list(self._loaded):
            if len(self._loaded) <= self.max_models:
                break
            if not self._pins[key] and key != keep:
                evicted.append(key)
                del self._loaded[key]
        return evicted

    def _evicted(self, keys: list):
        if not keys:
            return
        for key in keys:
            log.info("model %s left memory (at most %d kept)", key[0], self.max_models)
            for callback in self._listeners:
                callback(key)
        gc.collect()  # the weights go now, not at the next collection
        import torch

        from zoomvit.images import release_memory

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        release_memory()
