"""The web app over its API (gradio_client), launched in-process on the real DeiT-Tiny.

Every endpoint with only the image and with options, the numbers checked against the library, two sessions
side by side, bad uploads, extreme settings and clicks outside the image; the server answers after each.
"""

import re
import threading

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
import visualization
import vit_analyzer
from app_server import running_app

pytestmark = [  # Gradio's queue trips over pandas 3 deprecations: not ours
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture(scope="module")
def server(deit_tiny):
    with running_app(deit_tiny) as (demo, url):
        yield demo, url


@pytest.fixture(scope="module")
def url(server):
    return server[1]


@pytest.fixture(scope="module")
def client(url):
    return Client(url, verbose=False)


@pytest.fixture(scope="module")
def photos(shared_dir):
    folder = shared_dir / "data" / "imagenet-sample"
    return {"tench": str(folder / "n01440764_tench.JPEG"), "shark": str(folder / "n01484850_great_white_shark.JPEG")}


@pytest.fixture(scope="module")
def tench(photos, deit_tiny):
    """The tench photo and the library's own analysis of it, to check what the app shows."""
    return photos["tench"], vit_analyzer.analyze(deit_tiny, photos["tench"])


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
    assert caption.startswith("**Rollout**")
    shown = open_image(overlay)
    assert shown.size == visualization.fit_size(analysis.loaded.image.size, app.DISPLAY_SIDE)
    assert open_image(heads).width > open_image(heads).height  # 3 heads side by side


def test_explain_shows_the_library_map(client, tench, deit_tiny):
    """The overlay is the engine's map, drawn on the displayed image (JPEG-compressed on the way)."""
    path, analysis = tench
    overlay, *_ = call(client, handle_file(path), "cls", 5, "1", 0.9, "", "viridis", 1.0, api_name="/explain")
    display, geometry = visualization.resized_view(analysis.loaded.image, analysis.geometry, app.DISPLAY_SIDE)
    expected = visualization.heat_overlay(display, geometry, analysis.cls_map(5, 1), "viridis", 1.0)
    difference = np.abs(np.asarray(open_image(overlay), float) - np.asarray(expected, float)).mean()
    assert difference < 4, difference
    other = visualization.heat_overlay(display, geometry, analysis.cls_map(5, 2), "viridis", 1.0)
    assert np.abs(np.asarray(open_image(overlay), float) - np.asarray(other, float)).mean() > 2 * difference


def test_explain_with_options(client, tench, deit_tiny):
    path, analysis = tench
    goldfish = deit_tiny.find_label("goldfish")
    _, label, _, caption, _ = call(
        client, handle_file(path), view="grad_rollout", target="goldfish", colormap="inferno", opacity=0.8,
        api_name="/explain",
    )
    assert top_label(label)[0] == expected_label(analysis)  # the prediction does not depend on the target
    assert caption.startswith("**Gradient-weighted** for *goldfish") and f"{analysis.probs[goldfish]:.1%}" in caption
    _, _, _, caption, _ = call(client, handle_file(path), view="attention", layer=0, head="max", api_name="/explain")
    assert "layer 0, max over heads" in caption
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
    with pytest.raises(AppError):  # not one of the choices: Gradio refuses it
        call(client, handle_file(path), view="nonsense", api_name="/explain")
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
    overlay, caption, heads = call(client, handle_file(path), api_name="/inspect_patch")
    w, h = analysis.loaded.original_size
    scale = analysis.geometry.scale
    assert patch_named(caption) == analysis.geometry.pixel_to_patch(w / 2 * scale, h / 2 * scale)
    assert "what it attends to" in caption
    assert open_image(overlay).size == visualization.fit_size(analysis.loaded.image.size, app.DISPLAY_SIDE)


@pytest.mark.parametrize("x, y", [(300, 100), (120, 300), (440, 40)])
def test_inspect_patch_names_the_patch_under_the_point(client, tench, x, y):
    path, analysis = tench
    _, caption, _ = call(
        client, handle_file(path), x, y, "attended_by", layer=4, head="2", api_name="/inspect_patch",
    )
    scale = analysis.geometry.scale
    row, col = analysis.geometry.pixel_to_patch(x * scale, y * scale)
    assert patch_named(caption) == (row, col)
    assert "what attends to it in layer 4, head 2" in caption


@pytest.mark.parametrize("x, y", [(-5, 10), (10, 10_000), (1e6, -1e6), (3, 100)])
def test_a_point_outside_what_the_model_sees_is_a_message(client, tench, x, y):
    """Outside the image, or in the strip the centre crop cuts off (x=3 on a 500-pixel-wide photo)."""
    path, _ = tench
    overlay, caption, _ = call(client, handle_file(path), x, y, api_name="/inspect_patch")
    assert "outside what the model sees" in caption and patch_named(caption) is None
    assert open_image(overlay).width > 0
    _, caption, _ = call(client, handle_file(path), 250, 180, api_name="/inspect_patch")
    assert patch_named(caption) is not None


# ---- /zoom ----------------------------------------------------------------------------------------------------


def test_zoom(client, tench):
    path, analysis = tench
    boxed, crop, before, after, info = call(client, handle_file(path), api_name="/zoom")
    assert top_label(before)[0] == expected_label(analysis)
    assert re.search(r"Box \(\d+, \d+\) – \(\d+, \d+\) in image pixels", info)
    assert open_image(boxed).size == visualization.fit_size(analysis.loaded.image.size, app.DISPLAY_SIDE)
    assert max(open_image(crop).size) <= app.CROP_SIDE
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
    assert "Keep **50%**" in stats and "after block 6 (analysis mode)" in stats
    assert tokens(stats) == (197, 1 + 98)
    assert re.search(r"\| measured \| [\d.]+ ms \| [\d.]+ ms", stats)
    assert open_image(kept).size == visualization.fit_size(analysis.loaded.image.size, app.DISPLAY_SIDE)


def test_prune_at_the_extremes_and_with_options(client, tench):
    path, analysis = tench
    _, before, after, stats = call(client, handle_file(path), 100, api_name="/prune")
    assert tokens(stats) == (197, 197)
    assert [round(c["confidence"], 4) for c in after["confidences"]] == [
        round(c["confidence"], 4) for c in before["confidences"]
    ]
    _, before, after_10, stats = call(client, handle_file(path), 10, api_name="/prune")
    assert tokens(stats) == (197, 1 + 20)
    assert after_10["confidences"] != before["confidences"]
    _, _, _, stats = call(client, handle_file(path), 30, 3, "efficiency", api_name="/prune")
    assert "after block 3 (efficiency mode)" in stats
    for keep in (5, 0, 105):
        with pytest.raises(AppError):
            call(client, handle_file(path), keep, api_name="/prune")
    with pytest.raises(AppError):
        call(client, handle_file(path), 50, 99, api_name="/prune")
    _, _, _, stats = call(client, handle_file(path), 55, api_name="/prune")  # still serving
    assert "Keep **55%**" in stats


# ---- sessions and robustness ----------------------------------------------------------------------------------


def test_two_concurrent_sessions_keep_their_own_state(server, photos, deit_tiny):
    demo, url = server
    clients = {name: Client(url, verbose=False) for name in ("tench", "shark")}
    expected = {name: deit_tiny.label(vit_analyzer.predict(deit_tiny, path).argmax()) for name, path in photos.items()}
    assert expected["tench"] != expected["shark"]
    results, errors = {}, []

    def session(name):
        try:
            c, path = clients[name], handle_file(photos[name])
            _, label, *_ = c.predict(path, api_name="/explain")
            _, _, after, _ = c.predict(path, 100, api_name="/prune")
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
        assert session.key == app._file_key(photos[name])
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
    _, _, _, stats = client.predict(handle_file(tench[0]), 100, api_name="/prune")  # still serving
    assert "Keep **100%**" in stats


def test_unusual_images_work(client, tmp_path):
    """Grey, transparent and 16-bit files go through the library's loader, not Pillow's defaults in Gradio."""
    gradient = np.linspace(0, 65535, 64 * 48, dtype=np.uint16).reshape(48, 64)
    files = {"grey.png": Image.new("L", (64, 48), 90), "alpha.png": Image.new("RGBA", (64, 48), (255, 0, 0, 0)),
             "deep.png": Image.fromarray(gradient)}
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


def test_only_the_four_endpoints_are_public(client):
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/explain", "/inspect_patch", "/zoom", "/prune",
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
