"""The web app over its API (gradio_client), launched in-process on the real DeiT-Tiny.

Every endpoint with only the image and with options, the numbers checked against the library, two sessions
side by side, bad uploads, extreme settings and clicks outside the image; the server answers after each.
"""

import re
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from app_server import client, photos, running_app, server, url  # noqa: F401 (shared fixtures)
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from zoomvit import models, visualization
from zoomvit.app import layout, serving
from zoomvit.app import ui as app
from zoomvit.app.explorer import Explorer
from zoomvit.app.sessions import DISPLAY_SIDE, MIN_DISPLAY_SIDE, MIN_PANEL_SIDE, _file_key, display_side
from zoomvit.app.views import ViewSettings
from zoomvit.app.zoom_prune import CROP_SIDE
from zoomvit.errors import ZoomViTError
from zoomvit.pruning import TIMING_REPEATS
from zoomvit.vit_analyzer import analyze, predict

REPO = Path(__file__).resolve().parents[1]

pytestmark = [  # Gradio's queue trips over pandas 3 deprecations: not ours
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture(scope="module")
def tench(photos, deit_tiny):
    """The tench photo and the library's own analysis of it, to check what the app shows."""
    return photos["tench"], analyze(deit_tiny, photos["tench"])


def top_label(value):
    return value["label"], [c["label"] for c in value["confidences"]]


def expected_label(analysis):
    return analysis.bundle.label(analysis.predicted)


def open_image(path):
    with Image.open(path) as img:
        return img.convert("RGB")


def session_of(demo, client):
    """White box: the Session object the server keeps in this client's gr.State."""
    state = next(block for block in demo.blocks.values() if isinstance(block, app.gr.State))
    return demo.state_holder[client.session_hash].state_data.get(state._id)


def call(client, *args, api_name, **kwargs):
    return client.predict(*args, api_name=api_name, **kwargs)


# ---- /explain ------------------------------------------------------------------------------------------------


def test_explain_with_only_the_image(client, tench):
    path, analysis = tench
    overlay, label, diagnosis, caption, heads = call(client, handle_file(path), api_name="/explain")
    top, names = top_label(label)
    assert top == expected_label(analysis) and len(names) == 5
    assert names == [p.label for p in analysis.top()]
    assert re.match(r"\*\*Intent: (good|inverted|diffuse)\*\*: .+", diagnosis)
    assert caption.startswith("**Gradient-weighted**")  # config.DEFAULT_VIEW: the eval's most faithful map
    shown = open_image(overlay)
    assert shown.size == visualization.fit_size(analysis.loaded.image.size, DISPLAY_SIDE)
    assert open_image(heads).width > open_image(heads).height  # 3 heads side by side


def test_explain_shows_the_library_map(client, tench, deit_tiny):
    """The overlay is the engine's map, drawn on the displayed image (JPEG-compressed on the way). Heads are
    numbered from 1, as blocks are: head 2 of block 6 is the library's head index 1 of layer index 5."""
    path, analysis = tench
    overlay, *_ = call(client, handle_file(path), "cls", 6, "2", 0.9, "", "viridis", 1.0, api_name="/explain")
    display, geometry = visualization.resized_view(analysis.loaded.image, analysis.geometry, DISPLAY_SIDE)
    expected = visualization.heat_overlay(display, geometry, analysis.cls_map(5, 1), "viridis", 1.0)
    difference = np.abs(np.asarray(open_image(overlay), float) - np.asarray(expected, float)).mean()
    assert difference < 4, difference
    other = visualization.heat_overlay(display, geometry, analysis.cls_map(5, 2), "viridis", 1.0)
    assert np.abs(np.asarray(open_image(overlay), float) - np.asarray(other, float)).mean() > 2 * difference


def test_explain_with_options(client, tench, deit_tiny):
    path, analysis = tench
    goldfish = deit_tiny.find_label("goldfish")
    _, label, _, caption, _ = call(
        client,
        handle_file(path),
        view="grad_rollout",
        target="goldfish",
        colormap="inferno",
        opacity=0.8,
        api_name="/explain",
    )
    assert top_label(label)[0] == expected_label(analysis)  # the prediction does not depend on the target
    assert caption.startswith("**Gradient-weighted** for *goldfish") and f"{analysis.probs[goldfish]:.1%}" in caption
    _, _, _, caption, _ = call(client, handle_file(path), view="attention", block=1, head="max", api_name="/explain")
    assert "block 1, max over heads" in caption
    _, _, _, caption, _ = call(client, handle_file(path), view="intent", target=str(goldfish), api_name="/explain")
    assert caption.startswith("**Intent** for *goldfish")
    _, _, _, caption, _ = call(client, handle_file(path), view="rollout", discard_ratio=0.0, api_name="/explain")
    assert "discard ratio 0.00" in caption


def test_explain_errors_are_messages(client, tench):
    path, _ = tench
    with pytest.raises(AppError, match="matches .* labels"):
        call(client, handle_file(path), view="grad_rollout", target="dog", api_name="/explain")
    with pytest.raises(AppError, match="No class label matches"):
        call(client, handle_file(path), view="intent", target="no such thing", api_name="/explain")
    with pytest.raises(AppError, match=r"'crane' names 2 classes: 'crane' \[134\], 'crane' \[517\]"):
        call(client, handle_file(path), view="intent", target="crane", api_name="/explain")
    # not one of the choices: the message names the parameter (Gradio's own said "Value: nonsense is not in the
    # list of choices", naming none)
    with pytest.raises(AppError, match=r"View must be one of rollout, grad_rollout, .*; got 'nonsense'"):
        call(client, handle_file(path), view="nonsense", api_name="/explain")
    with pytest.raises(AppError, match=r"Prune after block must be in 1..11 .*, got six"):
        call(client, handle_file(path), 0.5, "six", api_name="/prune")
    with pytest.raises(AppError, match="Unknown mode 'fast'"):
        call(client, handle_file(path), 0.5, 6, "fast", api_name="/prune")
    with pytest.raises(AppError, match="Unknown fusion 'blend'"):
        call(client, handle_file(path), 0.5, 6, "efficiency", "blend", api_name="/prune")
    with pytest.raises(AppError, match="Unknown zoom policy 'sometimes'"):
        call(client, handle_file(path), "sometimes", api_name="/zoom")
    with pytest.raises(AppError, match="No image"):
        call(client, None, api_name="/explain")
    _, label, *_ = call(client, handle_file(path), api_name="/explain")  # still serving
    assert label["label"]


# ---- /inspect_patch -------------------------------------------------------------------------------------------


def patch_named(caption):
    found = re.search(r"row (\d+), column (\d+)", caption)
    return (int(found[1]), int(found[2])) if found else None


def test_inspect_patch_with_only_the_image_is_the_centre(client, tench):
    path, analysis = tench
    overlay, caption, heads, x, y = call(client, handle_file(path), api_name="/inspect_patch")
    w, h = analysis.loaded.original_size
    scale = analysis.geometry.scale
    assert f"the image centre (x={w / 2:g}, y={h / 2:g})" in caption
    assert abs(x - w / 2) <= 0.5 and abs(y - h / 2) <= 0.5  # the boxes show whole pixels
    assert patch_named(caption) == analysis.geometry.pixel_to_patch(w / 2 * scale, h / 2 * scale)
    assert "what it attends to" in caption
    assert open_image(overlay).size == visualization.fit_size(analysis.loaded.image.size, DISPLAY_SIDE)


@pytest.mark.parametrize("x, y", [(300, 100), (120, 300), (440, 40)])
def test_inspect_patch_names_the_patch_under_the_point(client, tench, x, y):
    path, analysis = tench
    _, caption, _, x_used, y_used = call(
        client,
        handle_file(path),
        x,
        y,
        "attended_by",
        block=5,
        head="2",
        api_name="/inspect_patch",
    )
    assert (x_used, y_used) == (x, y)
    scale = analysis.geometry.scale
    row, col = analysis.geometry.pixel_to_patch(x * scale, y * scale)
    assert patch_named(caption) == (row, col)
    assert "what attends to it in block 5, head 2" in caption


@pytest.mark.parametrize("x, y", [(-5, 10), (10, 10_000), (1e6, -1e6), (3, 100), (1e308, 5), (-1e308, 1e308)])
def test_a_point_outside_what_the_model_sees_is_a_message(client, tench, x, y):
    """Outside the image, or in the strip the centre crop cuts off (x=3 on a 500-pixel-wide photo)."""
    path, _ = tench
    overlay, caption, *_ = call(client, handle_file(path), x, y, api_name="/inspect_patch")
    assert "outside what the model sees" in caption and patch_named(caption) is None
    assert open_image(overlay).width > 0
    _, caption, *_ = call(client, handle_file(path), 250, 180, api_name="/inspect_patch")
    assert patch_named(caption) is not None


# ---- /zoom ----------------------------------------------------------------------------------------------------


def test_zoom(client, tench):
    path, analysis = tench
    boxed, crop, before, after, info = call(client, handle_file(path), api_name="/zoom")
    assert top_label(before)[0] == expected_label(analysis)
    assert re.search(r"Box \(\d+, \d+\) – \(\d+, \d+\) in image pixels", info)
    assert open_image(boxed).size == visualization.fit_size(analysis.loaded.image.size, DISPLAY_SIDE)
    assert max(open_image(crop).size) <= CROP_SIDE
    _, _, _, after, info = call(client, handle_file(path), "always", api_name="/zoom")
    assert info.startswith("**Zoomed in**")


# ---- /prune ---------------------------------------------------------------------------------------------------


def tokens(stats):
    found = re.search(r"\| tokens \| (\d+) \| (\d+) \|", stats)
    return int(found[1]), int(found[2])


def test_prune_with_only_the_image(client, tench):
    path, analysis = tench
    kept, before, after, stats = call(client, handle_file(path), api_name="/prune")
    assert top_label(before)[0] == expected_label(analysis)
    assert "Keep **0.50** of the patch tokens (50%)" in stats and "after block 6 of 12 (analysis mode)" in stats
    assert tokens(stats) == (197, 1 + 98)
    timed = re.search(
        r"\| time: median of (\d+) \(range\) \| ([\d.]+) ms \(([\d.]+)–([\d.]+)\) \| ([\d.]+) ms \(([\d.]+)–([\d.]+)\)",
        stats,
    )
    assert timed and int(timed[1]) == TIMING_REPEATS
    for median, low, high in (timed.group(2, 3, 4), timed.group(5, 6, 7)):
        assert float(low) <= float(median) <= float(high)
    assert "noise" in stats
    assert open_image(kept).size == visualization.fit_size(analysis.loaded.image.size, DISPLAY_SIDE)


def test_prune_at_the_extremes_and_with_options(client, tench):
    path, analysis = tench
    _, before, after, stats = call(client, handle_file(path), 1.0, api_name="/prune")
    assert tokens(stats) == (197, 197)
    assert [round(c["confidence"], 4) for c in after["confidences"]] == [
        round(c["confidence"], 4) for c in before["confidences"]
    ]
    _, before, after_10, stats = call(client, handle_file(path), 0.1, api_name="/prune")
    assert tokens(stats) == (197, 1 + 20)
    assert after_10["confidences"] != before["confidences"]
    _, _, _, stats = call(client, handle_file(path), 0.3, 3, "efficiency", api_name="/prune")
    assert "after block 3 of 12 (efficiency mode, merge)" in stats  # the stats name the fusion, merge by default
    for keep in (0.05, 0, 1.05, 50):
        with pytest.raises(AppError):
            call(client, handle_file(path), keep, api_name="/prune")
    for after_block in (0, 12, 99):  # after the last block nothing is left to prune
        with pytest.raises(AppError):
            call(client, handle_file(path), 0.5, after_block, api_name="/prune")
    _, _, _, stats = call(client, handle_file(path), 0.55, 11, api_name="/prune")  # still serving
    assert "Keep **0.55**" in stats and "after block 11 of 12" in stats


# ---- sessions and robustness ----------------------------------------------------------------------------------


def test_two_concurrent_sessions_keep_their_own_state(server, photos, deit_tiny):
    demo, url = server
    clients = {name: Client(url, verbose=False) for name in ("tench", "shark")}
    expected = {name: deit_tiny.label(predict(deit_tiny, path).argmax()) for name, path in photos.items()}
    assert expected["tench"] != expected["shark"]
    results, errors = {}, []

    def session(name):
        try:
            c, path = clients[name], handle_file(photos[name])
            _, label, *_ = c.predict(path, api_name="/explain")
            _, _, after, _ = c.predict(path, 1.0, api_name="/prune")
            _, _, before, *_ = c.predict(path, api_name="/zoom")
            results[name] = (label["label"], after["label"], before["label"])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(name,)) for name in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    for name in clients:
        assert results[name] == (expected[name],) * 3
    sessions = {name: session_of(demo, c) for name, c in clients.items()}
    assert sessions["tench"] is not sessions["shark"]
    for name, session in sessions.items():
        assert session.key == _file_key(photos[name])
        assert session.analysis.probs.argmax() == deit_tiny.find_label(expected[name])


def test_a_text_file_named_png_is_a_message_and_the_server_stays_up(client, tmp_path, tench):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image\n")
    for api_name in ("/explain", "/inspect_patch", "/zoom", "/prune"):
        with pytest.raises(AppError, match="Not an image file"):
            client.predict(handle_file(str(fake)), api_name=api_name)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(AppError, match="empty"):
        client.predict(handle_file(str(empty)), api_name="/explain")
    path, analysis = tench
    _, label, *_ = client.predict(handle_file(path), api_name="/explain")
    assert label["label"] == expected_label(analysis)


def _truncated_jpeg(path):
    noise = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, "JPEG", quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD_FILES = {
    "noise.jpg": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "Not an image"),
    "cut.jpg": (_truncated_jpeg, "Could not read"),
    "huge.png": (lambda p: Image.new("1", (20001, 20001)).save(p), "pixels"),
    "strip.png": (lambda p: Image.new("RGB", (2000, 10)).save(p), "aspect ratio"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_images_are_messages(client, tmp_path, name, tench):
    make, message = BAD_FILES[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(path)), api_name="/explain")
    _, _, _, stats = client.predict(handle_file(tench[0]), 1.0, api_name="/prune")  # still serving
    assert "Keep **1.00**" in stats


def test_unusual_images_work(client, tmp_path):
    """Grey, transparent and 16-bit files go through the library's loader, not Pillow's defaults in Gradio."""
    gradient = np.linspace(0, 65535, 64 * 48, dtype=np.uint16).reshape(48, 64)
    files = {
        "grey.png": Image.new("L", (64, 48), 90),
        "alpha.png": Image.new("RGBA", (64, 48), (255, 0, 0, 0)),
        "deep.png": Image.fromarray(gradient),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
        _, label, *_ = client.predict(handle_file(str(tmp_path / name)), api_name="/explain")
        assert len(label["confidences"]) == 5


def test_an_upload_above_the_size_cap_is_refused(url, tmp_path, tench):
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(26 * 1024 * 1024)  # above MAX_UPLOAD (25 MB), sparse on disk
    fresh = Client(url, verbose=False)
    with pytest.raises(Exception):  # noqa: B017 - Gradio answers 413 at the upload itself
        fresh.predict(handle_file(str(big)), api_name="/explain")
    _, label, *_ = fresh.predict(handle_file(tench[0]), api_name="/explain")
    assert label["label"]


def test_only_the_five_endpoints_are_public(client):
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/explain",
        "/inspect_patch",
        "/zoom",
        "/prune",
        "/compare",
    }


def test_served_locally_without_a_share_link():
    options = app.launch_options()
    assert options["server_name"] == "127.0.0.1" and options["share"] is False
    assert options["max_file_size"] == app.MAX_UPLOAD and options["ssr_mode"] is False


def test_a_model_that_does_not_load_is_one_line_and_status_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--model", str(tmp_path / "no-such-model")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zoomvit: error: ") and "no-such-model" in err[0]


# ---- hardening: untrusted paths, tiny images, conventions, the temp folder, exports ---------------------------


def raw_call(url, api_name, data):
    """One call over Gradio's plain HTTP API, as any script could make it (gradio_client would upload a local
    file itself): the event name and the data of the answer."""
    import httpx

    event_id = httpx.post(f"{url}gradio_api/call/{api_name}", json={"data": data}, timeout=30).json()["event_id"]
    answer = httpx.get(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=120).text
    event = re.search(r"^event: (\w+)", answer, re.M)[1]
    return event, answer.split("data:", 1)[1].strip()


RAW_OPTIONS = {  # every input after the image: the plain HTTP API fills in no defaults
    "explain": ["rollout", -1, "mean", 0.9, "", "jet", 0.5],
    "inspect_patch": [None, None, "attends_to", "rollout", -1, "mean", 0.9, "", "jet", 0.5],
    "zoom": ["adaptive"],
    "prune": [0.5, 6, "analysis", "merge"],
}


@pytest.mark.parametrize("api_name", RAW_OPTIONS)
def test_server_paths_that_were_not_uploaded_are_refused_alike(url, tench, api_name):
    """A file input naming a server path is refused with one message, whether the path is a real image, another
    file, a folder, a URL or nothing at all: no pixels come back and nothing tells what exists. With Gradio's
    file marker Gradio would copy the path (or fetch the URL) into its cache first: refused the same way."""
    real_image = tench[0]  # exists, and is an image the model would happily explain
    upload_folder = serving.get_upload_folder()
    ours = (
        '{"error": "This file did not come through this app\'s upload; upload it again.", "duration": 10, '
        '"visible": true, "title": "Error"}'
    )
    gradios = '{"error": null}'  # Gradio's own refusal of a marked path outside its folder names no cause
    for marker in ({}, {"meta": {"_type": "gradio.FileData"}}):
        answers = {}
        for path in (
            real_image,
            "/etc/hostname",
            "/no/such/file.png",
            "/",
            f"{upload_folder}/../../etc/hostname",
            upload_folder,
            "http://127.0.0.1:9/x.png",
        ):
            answers[path] = raw_call(url, api_name, [{"path": path, **marker}, *RAW_OPTIONS[api_name]])
            assert answers[path] in {("error", ours), ("error", gradios)}, (path, marker, answers[path])
        assert answers[real_image] == answers["/no/such/file.png"] == answers["/etc/hostname"]
        if not marker:
            assert set(answers.values()) == {("error", ours)}


def test_uploaded_file_accepts_only_the_upload_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    inside = tmp_path / "uploads" / "abc" / "photo.png"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"x")
    assert serving.uploaded_file(str(inside)) == str(inside.resolve())
    outside = tmp_path / "photo.png"
    outside.write_bytes(b"x")
    link = tmp_path / "uploads" / "abc" / "link.png"
    link.symlink_to(outside)  # a link inside that points outside is outside
    for path in (outside, link, tmp_path / "uploads", tmp_path / "uploads" / ".." / "photo.png"):
        with pytest.raises(app.gr.Error):
            serving.uploaded_file(str(path))


@pytest.mark.parametrize("size", [(8, 8), (12, 600), (1, 1), (600, 12)])
def test_tiny_images_are_shown_blown_up_and_their_patches_inspectable(client, tmp_path, size):
    """Images below one patch on a side: a defined, visible result (the display is blown up), and a click or
    a coordinate on them names a patch."""
    rng = np.random.default_rng(0)
    path = tmp_path / f"tiny_{size[0]}x{size[1]}.png"
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    overlay, label, _, _, _ = call(client, handle_file(str(path)), api_name="/explain")
    assert len(label["confidences"]) == 5
    shown = open_image(overlay).size
    # At most DISPLAY_SIDE long, but a 50:1 strip keeps MIN_PANEL_SIDE across (it was 15 pixels across).
    assert shown == visualization.fit_size(size, display_side(size), MIN_DISPLAY_SIDE)
    assert max(shown) == DISPLAY_SIDE or min(shown) >= MIN_DISPLAY_SIDE or min(shown) == MIN_PANEL_SIDE
    assert min(shown) >= MIN_PANEL_SIDE
    _, caption, _, x, y = call(client, handle_file(str(path)), api_name="/inspect_patch")
    assert patch_named(caption) is not None, caption
    _, caption, *_ = call(client, handle_file(str(path)), 0, 0, api_name="/inspect_patch")
    assert "outside what the model sees" in caption or patch_named(caption) is not None


def test_rollout_of_one_head_says_which_head(client, tench):
    path, _ = tench
    _, _, _, caption, _ = call(client, handle_file(path), "rollout", 12, "2", api_name="/explain")
    assert "(head 2," in caption and "mean over heads" not in caption
    _, _, _, caption, _ = call(client, handle_file(path), "rollout", 12, "max", api_name="/explain")
    assert "(max over heads," in caption


def test_blocks_are_numbered_one_to_twelve(client, tench, deit_tiny):
    path, analysis = tench
    _, _, _, caption, _ = call(client, handle_file(path), "cls", 1, "mean", api_name="/explain")
    assert "block 1, mean over heads" in caption
    _, _, _, last, _ = call(client, handle_file(path), "cls", 12, api_name="/explain")
    assert "block 12," in last
    for block in (0, 13, 2.5, "x"):
        with pytest.raises(AppError, match="Block must be|not in the list of choices"):
            call(client, handle_file(path), "cls", block, api_name="/explain")


def test_inspecting_with_one_coordinate_or_a_non_number_is_a_message(client, tench):
    path, _ = tench
    with pytest.raises(AppError, match="both x and y"):
        call(client, handle_file(path), 100, None, api_name="/inspect_patch")
    with pytest.raises(AppError):
        call(client, handle_file(path), "left", 5, api_name="/inspect_patch")
    _, caption, *_ = call(client, handle_file(path), 250, 180, api_name="/inspect_patch")  # still serving
    assert patch_named(caption) is not None


def test_model_events_run_one_at_a_time(server):
    """Every event that can run the model (and decode an image) shares one queue slot: they cannot pile up."""
    demo, _ = server
    model_fns = [fn for fn in demo.fns.values() if fn.concurrency_id == app.MODEL_QUEUE]
    names = {fn.name for fn in model_fns}
    assert {"explain", "inspect_patch", "zoom", "prune", "on_image", "prune_ui", "change_target"} <= names, names
    assert all(fn.concurrency_limit == 1 for fn in model_fns)


def test_the_janitor_keeps_the_temp_folder_under_its_size_and_age(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    now = time.time()
    files = {}
    for i, (name, age) in enumerate([("stale", 7200), ("a", 50), ("b", 40), ("c", 30), ("d", 20), ("example", 9000)]):
        path = tmp_path / f"dir{i}" / f"{name}.jpg"
        path.parent.mkdir()
        path.write_bytes(b"\0" * 1000)
        os.utime(path, (now - age, now - age))
        files[name] = path
    janitor = serving.TempJanitor(max_bytes=3500, max_age_s=3600)
    janitor.protectors.append(lambda: {str(files["example"])})
    left = janitor.sweep()
    survivors = {name for name, path in files.items() if path.exists()}
    assert survivors == {"c", "d", "example"} and left == 3000  # the kept example counts towards the size
    assert not (tmp_path / "dir0").exists()  # emptied folders go too


def test_bare_uploads_do_not_fill_the_temp_folder(url, monkeypatch):
    """Posts to the upload route that never reach an event are swept right after, down to the cap."""
    import time

    import httpx

    folder = Path(serving.get_upload_folder())

    def size():
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    cap = size() + 3 * 1024 * 1024
    monkeypatch.setattr(serving.JANITOR, "max_bytes", cap)
    rng = np.random.default_rng(3)
    for i in range(12):
        response = httpx.post(
            f"{url}gradio_api/upload", files={"files": (f"junk{i}.bin", rng.bytes(1024 * 1024))}, timeout=30
        )
        assert response.status_code == 200
        time.sleep(0.1)
    deadline = time.time() + 10
    while size() > cap and time.time() < deadline:
        time.sleep(0.2)
    assert size() <= cap


def test_exports_are_full_size_pictures_with_a_legend_and_the_result_as_json(deit_tiny, tench, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    path, analysis = tench
    explorer = Explorer(deit_tiny)
    session = explorer.store.session_for(path, None)
    with pytest.raises(ZoomViTError, match="Nothing to export"):
        explorer.exports.export_zoom_prune(session)
    explorer.views.render(session, ViewSettings("attends_to", "intent", 12, "mean", 0.9, "goldfish", "viridis", 0.6))
    png, js = explorer.exports.export_explore(session)
    picture = open_image(png)
    working = analysis.loaded.image
    assert picture.width == working.width and picture.height > working.height + 20  # colorbar + caption below
    goldfish = deit_tiny.find_label("goldfish")
    expected = visualization.heat_overlay(working, analysis.geometry, analysis.intent(goldfish), "viridis", 0.6)
    top = np.asarray(picture.crop((0, 0, *working.size)), float)
    assert np.abs(top - np.asarray(expected, float)).mean() < 1.0
    data = json.loads(Path(js).read_text())
    assert data["top"][0]["index"] == analysis.predicted and data["settings"]["target"]["index"] == goldfish
    assert np.allclose(data["map"], analysis.intent(goldfish), atol=1e-4)
    assert "block" not in data["settings"] and data["diagnosis"]["kind"] in ("good", "inverted", "diffuse")

    explorer.zoom_prune.zoom(path, "always", session)
    explorer.zoom_prune.prune(path, 0.3, 6, "analysis", session=session)  # fusion comes before it
    png, js = explorer.exports.export_zoom_prune(session)
    data = json.loads(Path(js).read_text())
    assert data["prune"]["tokens_after"] == 1 + 59 and np.asarray(data["prune"]["kept_mask"]).shape == analysis.grid
    assert len(data["prune"]["latency_before_runs_ms"]) == TIMING_REPEATS
    assert data["zoom"]["box"] == [round(c, 1) for c in session.zoom_result.box]
    assert open_image(png).width == working.width


# The view controls each view reads besides colormap and opacity (#24): what the export records.
READ_BY = {
    "rollout": {"head", "discard_ratio"},
    "grad_rollout": {"target"},
    "intent": {"target"},
    "cls": {"block", "head"},
    "attention": {"block", "head"},
    "patch": {"direction", "block", "head"},
}
ANOTHER = {"direction": "attended_by", "block": 3, "head": "2", "discard_ratio": 0.5, "target": "goldfish"}


def test_the_explore_export_records_only_the_settings_its_view_reads(deit_tiny, tench, tmp_path, monkeypatch):
    """Each view's map changes with the controls the export records, and stays the same under every other one."""
    import json

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    path, _ = tench
    explorer = Explorer(deit_tiny)
    session = explorer.store.session_for(path, None)
    for view, reads in READ_BY.items():
        session.patch = (5, 6) if view == "patch" else None
        base = ViewSettings(view="rollout" if view == "patch" else view)
        explorer.views.render(session, base)
        shown = session.shown.grid_map
        _, js = explorer.exports.export_explore(session)
        settings = json.loads(Path(js).read_text())["settings"]
        assert set(settings) == {"view", "colormap", "opacity"} | reads, view
        assert settings["view"] == view
        for control, value in ANOTHER.items():
            explorer.views.render(session, replace(base, **{control: value}))
            changed = not np.array_equal(session.shown.grid_map, shown)
            assert changed == (control in reads), (view, control)


def test_the_prune_caption_says_from_which_class_to_which(deit_tiny, tench):
    from zoomvit.vit_analyzer import decision_change  # the CLI can say it the same way

    path, _ = tench
    explorer = Explorer(deit_tiny)
    session = explorer.store.session_for(path, None)
    text = explorer.zoom_prune.prune(path, 0.1, 2, "analysis", session=session)[3]
    before, after = session.prune_result.before[0], session.prune_result.after[0]
    assert before.index != after.index
    first = text.split("\n\n")[0]
    assert f"decision **changed**: {before.label} ({before.prob:.2f}) -> {after.label} ({after.prob:.2f})" in first
    text = explorer.zoom_prune.prune(path, 0.3, 6, "analysis", session=session)[3]
    after = session.prune_result.after[0]
    assert f"decision **kept**: {before.label} ({before.prob:.2f} -> {after.prob:.2f})" in text
    assert decision_change(before, after) == f"{before.label} ({before.prob:.2f} -> {after.prob:.2f})"


def test_the_zoom_prune_export_shows_the_zoom_only_while_it_is_on(deit_tiny, tench, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    path, analysis = tench
    explorer = Explorer(deit_tiny)
    handlers, session = explorer.zoom_prune, explorer.store.session_for(path, None)
    handlers.toggle_zoom(True, path, "always", session)
    handlers.prune(path, 0.3, 6, "analysis", session=session)
    _, js = explorer.exports.export_zoom_prune(session, True)
    assert {"zoom", "prune"} <= set(json.loads(Path(js).read_text()))

    pruned = visualization.token_mask_overlay(analysis.loaded.image, analysis.geometry, session.prune_result.kept_mask)
    handlers.toggle_zoom(False, path, "always", session)  # the checkbox turned off
    for zoom_on in (False, True):  # what the checkbox says, and no zoom left behind either
        png, js = explorer.exports.export_zoom_prune(session, zoom_on)
        data = json.loads(Path(js).read_text())
        assert "zoom" not in data and "prune" in data
        picture = open_image(png).crop((0, 0, *pruned.size))
        assert np.array_equal(np.asarray(picture), np.asarray(pruned))  # no red box on it

    handlers.toggle_zoom(True, path, "always", session)
    _, js = explorer.exports.export_zoom_prune(session, False)  # a zoom kept while the box is off: not exported
    assert "zoom" not in json.loads(Path(js).read_text())


def test_a_broken_file_is_warned_about_once_when_its_change_event_comes_twice(deit_tiny, tmp_path, monkeypatch):
    """Replacing a photo fires the image's .change twice for the same file (Gradio 6): one warning, and the
    reason stays on screen both times."""
    warnings = []
    monkeypatch.setattr(app.gr, "Warning", lambda message, *args, **kwargs: warnings.append(message))
    explorer = Explorer(deit_tiny)
    fake = tmp_path / "holiday.jpg"
    fake.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    first = explorer.explore.on_image(str(fake), ViewSettings(), None)
    second = explorer.explore.on_image(str(fake), ViewSettings(), first[-1])
    assert len(warnings) == 1 and "Not an image file" in warnings[0]
    assert first[:5] == second[:5] and "Could not analyse this file" in second[2] and "Not an image" in second[2]
    # A good image after it is analysed, and the broken file after that is warned about again.
    good = explorer.explore.on_image(str(REPO / "zoomvit" / "assets" / "wall_clock.jpg"), ViewSettings(), second[-1])
    assert good[1] and "Intent" in good[2]
    explorer.explore.on_image(str(fake), ViewSettings(), good[-1])
    assert len(warnings) == 2


def test_a_guess_is_not_shown_as_good_intent(deit_tiny, tmp_path):
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 8000, 3), dtype=np.uint8)).save(noise)
    explorer = Explorer(deit_tiny)
    _, label, diagnosis, *_ = explorer.explore.explain(str(noise))
    assert max(label.values()) < 0.1
    assert diagnosis.startswith("**Intent: unsure, the prediction itself is a guess** (map: ")
    assert "**Intent: good**" not in diagnosis and "has only" in diagnosis


def test_examples_are_listed_with_captions_and_licences():
    examples, captions = layout.example_files()
    assert len(examples) == len(captions) >= 6
    readme = (layout.EXAMPLES_DIR / "README.md").read_text()
    photos = [Path(e[0]).name for e in examples if Path(e[0]).name.startswith("photo_")]
    assert len(photos) >= 3
    for (path,), caption in zip(examples, captions):
        assert Path(path).is_file() and Path(path).name in readme
        assert "_" not in caption and not caption.endswith(".jpg")  # for users, not file names
    for photo in photos:
        line = next(line for line in readme.splitlines() if photo in line)
        assert "CC0" in line or "public domain" in line.lower(), line


def test_no_share_buttons(server):
    """Share only works on Hugging Face Spaces; elsewhere it only says so."""
    demo, _ = server
    images = [block for block in demo.blocks.values() if isinstance(block, app.gr.Image)]
    assert len(images) >= 6
    for image in images:
        assert image.buttons is not None and "share" not in image.buttons, image.elem_id


def test_a_busy_port_is_one_line_and_status_2_before_the_model_loads(capsys, monkeypatch):
    import socket

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            app.main(["--port", str(port), "--model", "whatever"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"port {port}" in err[0] and "in use" in err[0]


def header_of(demo) -> str:
    return next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "header").value


def test_the_app_says_which_family_and_token_layout_it_loaded(server):
    demo, _ = server
    assert (
        "Model family: ViT: class token, then patches; the head reads the class token. Running on cpu in float32."
        in header_of(demo)
    )


def test_the_header_shows_the_device_and_dtype_of_the_model(deit_tiny_bf16):
    assert "Running on cpu in bfloat16." in header_of(app.build_demo(deit_tiny_bf16))


def test_a_bad_device_is_one_line_and_status_2_before_the_model_loads(capsys, monkeypatch):
    monkeypatch.setattr(models, "read_model_config", lambda *a, **k: pytest.fail("the model must not load"))
    monkeypatch.setattr(app, "build_demo", lambda *a, **k: pytest.fail("the app must not start"))
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--port", "0", "--model", "whatever", "--device", "tpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zoomvit: error: Unknown device 'tpu': use auto, cpu, cuda")


def test_an_inline_data_url_is_refused_before_anything_decodes_it(url, monkeypatch):
    """An image sent inline as a data: URL skips the upload size cap, and Gradio's own preprocessing would decode
    it whole before the app's budget looks at it (a 280 KB 16-bit PNG took 1.6 GB): refused like any input that
    did not come through the upload, and never decoded."""
    import base64
    import io

    from gradio import image_utils

    decoded = []
    monkeypatch.setattr(image_utils, "decode_base64_to_file", lambda *a, **k: decoded.append(a) or "/tmp/x.png")
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buffer, "png")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    ours = (
        '{"error": "This file did not come through this app\'s upload; upload it again.", "duration": 10, '
        '"visible": true, "title": "Error"}'
    )
    for api_name, options in RAW_OPTIONS.items():
        payload = {"path": None, "url": data_url, "meta": {"_type": "gradio.FileData"}}
        assert raw_call(url, api_name, [payload, *options]) == ("error", ours), api_name
    assert decoded == []


def test_the_direct_run_routes_that_would_skip_the_queue_are_closed(url):
    """/gradio_api/run/* ran a model call outside the one-at-a-time queue; every model route is queued."""
    import httpx

    for api_name, options in RAW_OPTIONS.items():
        response = httpx.post(f"{url}gradio_api/run/{api_name}", json={"data": [None, *options]}, timeout=30)
        assert response.status_code == 404 and "join the queue" in response.text, (api_name, response.text[:200])


def test_the_about_text_is_written_from_the_loaded_model_and_device(deit_tiny, tiny_vit):
    """It said "DeiT: resize to 256, crop 224" and "this server's CPU" whatever was loaded."""
    import dataclasses

    import torch

    from zoomvit.app.about import about_text

    deit = about_text(deit_tiny)
    assert "resized to 256×256, then the centre 224×224 taken" in deit and "blocks are numbered 1 to 12" in deit
    assert "several runs on this server's CPU" in deit and "{" not in deit
    squeezed = about_text(tiny_vit)  # a processor that resizes to 32x48 and crops nothing: no dark band
    assert "every image is resized to 48×32 pixels" in squeezed and "dark band" not in squeezed
    assert "blocks are numbered 1 to 2" in squeezed
    on_gpu = about_text(dataclasses.replace(deit_tiny, device=torch.device("cuda", 0)))
    assert "several runs on this server's GPU (cuda:0)" in on_gpu and "CPU" not in on_gpu
    about = next(
        b
        for b in app.build_demo(tiny_vit).blocks.values()
        if isinstance(b, app.gr.Markdown) and "Numbering" in str(b.value)
    )
    assert about.value == squeezed.strip()


def test_the_server_start_up_lines_never_suggest_a_share_link(deit_model_path):
    """Gradio's own start-up text says 'To create a public link, set `share=True`': this app has no share link."""
    import subprocess
    import sys
    import time

    import httpx
    from app_server import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--model", deit_model_path, "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("the app did not start")
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert f"on http://127.0.0.1:{port}" in output
    assert "share=True" not in output and "public link" not in output.lower(), output


def test_heads_are_numbered_from_one_as_blocks_are(client, tench):
    """Heads were numbered 0..H-1 while blocks were 1..L: one convention, the API's head choices 1..H."""
    path, analysis = tench
    shown = {}
    for head, index in (("1", 0), ("3", 2)):
        overlay, *_, caption, _ = call(
            client, handle_file(path), "cls", 6, head, 0.9, "", "viridis", 1.0, api_name="/explain"
        )
        assert f"block 6, head {head}." in caption, caption
        display, geometry = visualization.resized_view(analysis.loaded.image, analysis.geometry, DISPLAY_SIDE)
        expected = visualization.heat_overlay(display, geometry, analysis.cls_map(5, index), "viridis", 1.0)
        shown[head] = np.abs(np.asarray(open_image(overlay), float) - np.asarray(expected, float)).mean()
    assert max(shown.values()) < 4, shown
    for bad in ("0", "4"):
        with pytest.raises(AppError, match=r"Head must be in 1\.\.3 \(or -1 for the last\), or mean, max or min"):
            call(client, handle_file(path), "cls", 6, bad, api_name="/explain")


def test_a_tiny_image_is_said_to_be_tiny_and_its_exports_are_readable(deit_tiny, tmp_path, monkeypatch):
    """16x12 pixels: the caption says it is far below the model's input; both exports are figures wide enough
    for their legend and caption (they were a ValueError and a 1-px-wide picture)."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(tiny)
    explorer = Explorer(deit_tiny)
    *_, caption, _, session = explorer.explore.explain(str(tiny), ViewSettings(), None)
    assert "only 16×12 pixels, far below the model's 224×224 input" in caption
    explorer.zoom_prune.prune(str(tiny), 0.5, 6, "analysis", session=session)
    for png, _ in (explorer.exports.export_explore(session), explorer.exports.export_zoom_prune(session)):
        assert open_image(png).width >= visualization.FIGURE_MIN_WIDTH
