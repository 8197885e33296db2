"""The models the app serves (model_registry): loaded on demand, at most --max-models in memory (least recently
used out first, never one a running event uses), the sessions' analyses of a model that leaves dropped and made
again on next use; and the options that start the app with several models."""

import json
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from zoomvit import cli, config, models
from zoomvit.app import model_registry
from zoomvit.app import ui as app
from zoomvit.app.explorer import Explorer
from zoomvit.app.model_chooser import _pinning
from zoomvit.app.model_registry import ModelRegistry, cached_models
from zoomvit.app.sessions import ModelChoice, SessionStore, chosen_model
from zoomvit.app.views import ViewSettings
from zoomvit.errors import ModelLoadError, ZoomViTError


@pytest.fixture(scope="module")
def tiny_folders(tiny_vit, tmp_path_factory):
    """Three folders holding the tiny random ViT (save_pretrained: Hugging Face layout)."""
    folders = []
    for name in ("tiny-a", "tiny-b", "tiny-c"):
        folder = tmp_path_factory.mktemp("models") / name
        tiny_vit.model.save_pretrained(folder)
        tiny_vit.processor.save_pretrained(folder)
        folders.append(str(folder))
    return folders


def registry_of(folders, max_models=2, **kwargs):
    return ModelRegistry(folders, "cpu", "float32", max_models, include_cache=False, **kwargs)


def test_models_load_on_demand_and_the_least_recently_used_leaves_first(tiny_folders):
    a, b, c = tiny_folders
    registry = registry_of(tiny_folders)
    evicted = []
    registry.on_evict(evicted.append)
    assert registry.loaded() == [] and registry.default == a
    first = registry.get(a)
    assert first.name == a and first.num_layers == 2
    registry.get(b)
    assert registry.get() is first  # the default, used again: now the most recent
    assert registry.loaded() == [b, a]
    registry.get(c)  # over the cap: b, the least recently used, leaves
    assert registry.loaded() == [a, c]
    assert evicted == [registry.key(b)] and registry.key(b) == (str(Path(b).resolve()), "cpu", "float32")
    assert registry.get(b) is not registry.get(c)  # b comes back as a new load; a leaves now
    assert registry.loaded() == [b, c] and len(evicted) == 2


def test_one_model_is_one_object_however_it_is_named(tiny_folders, monkeypatch):
    a = tiny_folders[0]
    registry = registry_of(tiny_folders)
    loads = []
    real_loader = registry._loader
    monkeypatch.setattr(registry, "_loader", lambda *args: loads.append(args[0]) or real_loader(*args))
    bundle = registry.get(a)
    monkeypatch.chdir(Path(a).parent)
    assert registry.get(a + "/") is bundle and registry.get(Path(a).name) is bundle and registry.get(None) is bundle
    assert loads == [a]


def test_a_model_not_offered_is_refused_in_one_line(tiny_folders, tmp_path):
    registry = registry_of(tiny_folders[:2])
    with pytest.raises(ZoomViTError) as refused:
        registry.get(tiny_folders[2])
    assert str(refused.value) == (
        f"This server does not offer the model '{tiny_folders[2]}'; choose one of: tiny-a, tiny-b."
    )
    assert registry.choices() == [("tiny-a", tiny_folders[0]), ("tiny-b", tiny_folders[1])]
    assert registry.loaded() == []


def test_a_broken_model_is_refused_at_start_and_one_that_fails_later_leaves_the_others(tiny_folders, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="the folder has no config.json"):
        registry_of([tiny_folders[0], str(empty)])
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folders[1], broken)
    registry = registry_of([tiny_folders[0], str(broken)])
    kept = registry.get()
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError) as failed:
        registry.get(str(broken))
    assert "model.safetensors is corrupt or incomplete" in str(failed.value) and "\n" not in str(failed.value)
    assert registry.loaded() == [tiny_folders[0]] and registry.get() is kept


def test_a_pinned_model_stays_until_its_event_ends(tiny_folders):
    a, b, _ = tiny_folders
    registry = registry_of(tiny_folders, max_models=1)
    evicted = []
    registry.on_evict(evicted.append)
    with registry.pinned(a):
        registry.get(a)
        registry.get(b)  # over the cap, but a is in use: both stay for now
        assert registry.loaded() == [a, b] and evicted == []
    assert registry.loaded() == [b] and evicted == [registry.key(a)]


def test_max_models_is_checked_and_read_from_the_environment(tiny_folders, monkeypatch):
    for bad in (0, "0", "two", "1.5", -3):
        with pytest.raises(ZoomViTError) as refused:
            registry_of(tiny_folders, max_models=bad)
        assert str(refused.value) == f"--max-models must be a whole number of models, 1 or more, got {bad}."
    monkeypatch.setenv("ZOOMVIT_MAX_MODELS", "3")
    assert registry_of(tiny_folders, max_models=None).max_models == 3
    monkeypatch.setenv("ZOOMVIT_MAX_MODELS", "lots")
    with pytest.raises(ZoomViTError, match=r"^\$ZOOMVIT_MAX_MODELS must be a whole number .* got lots\.$"):
        registry_of(tiny_folders, max_models=None)
    monkeypatch.delenv("ZOOMVIT_MAX_MODELS")
    assert registry_of(tiny_folders, max_models=None).max_models == 2


# ---- sessions on a registry -----------------------------------------------------------------------------------


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_a_model_that_leaves_takes_the_sessions_analyses_and_they_come_back_on_use(tiny_folders, picture):
    a, b, _ = tiny_folders
    store = SessionStore(registry_of(tiny_folders, max_models=1))
    first = store.session_for(picture, None)  # the default model
    probs = first.analysis.probs.copy()
    assert first.model == a and first.bundle is store.registry.get(a)
    other = store.session_for(picture, ModelChoice(b))  # another session chose b: a leaves memory
    assert other.model == b and store.registry.loaded() == [b]
    assert first._analysis is None  # nothing of model a is held any more
    assert np.allclose(first.analysis.probs, probs)  # analysed again, with a loaded again
    assert store.registry.loaded() == [a] and other._analysis is None


def test_an_event_keeps_its_sessions_model_while_it_runs(tiny_folders, picture):
    a, b, _ = tiny_folders
    store = SessionStore(registry_of(tiny_folders, max_models=1))
    session = store.session_for(picture, None)

    def event(image, state):  # a handler that, mid-event, sees another session load model b
        store.registry.get(b)
        return state._analysis is not None and store.registry.loaded()

    assert _pinning(event, store.registry)(picture, session) == [a, b]
    assert store.registry.loaded() == [b] and session._analysis is None


def test_every_event_that_reads_the_session_pins_its_model(tiny_folders):
    registry = registry_of(tiny_folders)
    demo = app.build_demo(registry)
    session = next(fn.inputs[-1] for fn in demo.fns.values() if fn.api_name == "explain")
    reading = [fn for fn in demo.fns.values() if any(c is session for c in fn.inputs)]
    assert len(reading) > 10 and {fn.api_name for fn in reading} >= {"explain", "inspect_patch", "zoom", "prune"}
    pinned_code = _pinning(lambda: None, registry).__code__
    assert all(fn.fn.__code__ is pinned_code for fn in reading)
    chooser = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model")
    assert chooser.visible and chooser.choices == [
        ("tiny-a", tiny_folders[0]),
        ("tiny-b", tiny_folders[1]),
        ("tiny-c", tiny_folders[2]),
    ]


def test_the_state_says_which_model_a_session_chose(tiny_folders, picture):
    store = SessionStore(registry_of(tiny_folders))
    assert chosen_model(None) is None and chosen_model(ModelChoice(tiny_folders[1])) == tiny_folders[1]
    session = store.session_for(picture, ModelChoice(tiny_folders[1]))
    assert chosen_model(session) == tiny_folders[1] and store.bundle_for(session).name == tiny_folders[1]
    assert store.check_after_block("", session) == 1 and store.bundle_for(None).name == tiny_folders[0]


# ---- the local Hugging Face cache -----------------------------------------------------------------------------


def cache_repo(cache: Path, repo_id: str, source: str, drop=(), config_changes=None):
    """A repository in the hub cache's layout (refs/main -> snapshots/<commit>/files), from a model folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in Path(source).iterdir():
        if file.name not in drop:
            shutil.copy(file, snapshot / file.name)
    if config_changes:
        cfg = json.loads((snapshot / "config.json").read_text())
        cfg.update(config_changes)
        (snapshot / "config.json").write_text(json.dumps(cfg))


def test_supported_classifiers_in_the_hub_cache_are_offered(tiny_folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache_repo(cache, "someone/tiny-classifier", tiny_folders[0])
    cache_repo(cache, "someone/no-head", tiny_folders[0], config_changes={"architectures": ["ViTModel"]})
    cache_repo(cache, "someone/text-model", tiny_folders[0], config_changes={"model_type": "bert"})
    cache_repo(cache, "someone/no-weights", tiny_folders[0], drop=("model.safetensors",))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert cached_models() == ["someone/tiny-classifier"]
    registry = ModelRegistry([tiny_folders[1]], "cpu", "float32", 2)
    assert registry.choices() == [("tiny-b", tiny_folders[1]), ("someone/tiny-classifier", "someone/tiny-classifier")]
    assert registry.get("someone/tiny-classifier").num_layers == 2  # loaded from the cache, offline
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "none"))
    assert cached_models() == []


# ---- the command line -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("start", ["app", "cli"])
def test_model_repeats_and_the_first_is_the_default(start, tiny_folders, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    served = []
    monkeypatch.setattr(
        app, "build_demo", lambda registry: served.append(registry) or SimpleNamespace(launch=lambda **options: None)
    )
    a, b, _ = tiny_folders
    argv = ["--model", b, "--model", a, "--max-models", "1", "--device", "cpu", "--port", str(free_port())]
    assert (app.main(argv) if start == "app" else cli.main(["serve", *argv])) == 0
    registry = served[0]
    assert registry.choices() == [("tiny-b", b), ("tiny-a", a)] and registry.default == b
    assert registry.max_models == 1 and registry.loaded() == [b]  # the default, loaded before the server starts
    assert cli.build_parser().parse_args(["serve", "--model", a, "--model", b]).model == [a, b]
    assert app.build_parser().parse_args(["--model", a]).model == [a]


@pytest.mark.parametrize("value", ["0", "many"])
def test_max_models_is_checked_before_anything_loads(value, capsys, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("no model may load"))
    monkeypatch.setattr(model_registry, "cached_models", lambda: pytest.fail("the cache is not read"))
    expected = f"zoomvit: error: --max-models must be a whole number of models, 1 or more, got {value}."
    assert cli.main(["serve", "--max-models", value, "--port", str(free_port())]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [expected]
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--max-models", value, "--port", str(free_port())])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [expected]


EVICTED_PATHS = {  # every handler that may analyse a session again, called on a session whose model left memory
    "zoom": lambda ex, image, session: ex.zoom_prune.zoom(image, config.ZOOM_POLICY, session),
    "prune": lambda ex, image, session: ex.zoom_prune.prune(image, 0.5, None, "analysis", "drop", session),
    "compare": lambda ex, image, session: ex.compare.compare(image, None, None, ViewSettings(), session),
    "faithfulness": lambda ex, image, session: ex.faithfulness.compute(session),
    "export": lambda ex, image, session: ex.exports.export_explore(session),
    "target change": lambda ex, image, session: ex.explore.change_target(session, ViewSettings(target="1")),
}


@pytest.mark.parametrize("path", sorted(EVICTED_PATHS))
def test_every_path_analyses_an_evicted_session_again_without_hanging(path, tiny_folders, picture):
    """Tab X explains with model a; tab Y picks model b (a leaves memory: --max-models 1); X's next event must
    analyse its image again and answer, not wait forever on the lock its own event holds."""
    a, b, _ = tiny_folders
    ex = Explorer(registry_of(tiny_folders, max_models=1))
    *_, session = ex.explore.explain(picture, ViewSettings(), None)
    ex.store.session_for(picture, ModelChoice(b))  # another tab, another model: a leaves memory
    assert session._analysis is None and ex.store.registry.loaded() == [b]
    answered = []
    worker = threading.Thread(target=lambda: answered.append(EVICTED_PATHS[path](ex, picture, session)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), f"{path} never answered after its model left memory"
    assert answered and session._analysis is not None and session.model == a


def test_faithfulness_right_after_a_model_switch_measures_the_new_models_map(tiny_folders, picture):
    """The button pressed while the page is still analysing the image with the model just chosen (the session
    holds only that choice): the image is analysed with it and its map measured, not "Upload an image first."."""
    a, b, _ = tiny_folders
    ex = Explorer(registry_of(tiny_folders, max_models=1))
    *_, session = ex.explore.explain(picture, ViewSettings(), None)
    switched = ex.store.registry.offer(b).name
    plot, text, session = ex.measure_faithfulness(picture, ViewSettings(), ModelChoice(switched))
    assert plot["visible"] and "deletion AUC" in text["value"] and session.model == b
    assert ex.faithfulness.cached(session) is not None  # what the page then shows finds this result
    with pytest.raises(ZoomViTError, match="Upload an image first"):
        ex.measure_faithfulness(None, ViewSettings(), ModelChoice(switched))


def test_a_soak_of_tabs_switching_models_with_fewer_kept_than_offered_ends_without_errors(tiny_folders, picture):
    """Four tabs, three models offered, one kept in memory: each tab switches models and runs every path that may
    analyse its image again, each event pinning its model as the server does. Every call answers, none fails."""
    ex = Explorer(registry_of(tiny_folders, max_models=1))
    handlers = {**EVICTED_PATHS, "measure": lambda ex, image, s: ex.measure_faithfulness(image, ViewSettings(), s)}
    errors, done = [], []

    def tab(seed):
        rng = np.random.default_rng(seed)
        state = ex.explore.explain(picture, ViewSettings(), None)[-1]
        for step in range(12):
            name = tiny_folders[rng.integers(3)]
            with ex.store.registry.pinned(chosen_model(state)):
                try:
                    if step % 3 == 0:  # a switch: the chooser's load, then the new image chain
                        state = ModelChoice(ex.store.registry.offer(name).name)
                        state = ex.explore.explain(picture, ViewSettings(), state)[-1]
                    else:
                        path = sorted(handlers)[rng.integers(len(handlers))]
                        answer = handlers[path](ex, picture, state)
                        state = answer[-1] if path == "measure" else state
                except Exception as exc:  # noqa: BLE001 - counted
                    errors.append(f"{type(exc).__name__}: {exc}")
        done.append(seed)

    tabs = [threading.Thread(target=tab, args=(seed,), daemon=True) for seed in range(4)]
    for t in tabs:
        t.start()
    deadline = time.monotonic() + 180
    for t in tabs:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert sorted(done) == [0, 1, 2, 3], "a tab never finished: the server hangs"
    assert errors == []
