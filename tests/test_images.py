"""Bad and unusual inputs: load_image gives a clean RGB image or a clear ImageLoadError, and analyze copes.

Every image is generated here in tmp_path; nothing binary lives in the repository.
"""

import io
import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zoomvit import config
from zoomvit.errors import ImageLoadError
from zoomvit.images import decode_cost, load_image
from zoomvit.vit_analyzer import analyze, predict

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
REPO = Path(__file__).resolve().parents[1]
MB = 2**20


def assert_close_colour(pixel, expected, tolerance=40):
    assert max(abs(int(a) - int(b)) for a, b in zip(pixel, expected)) <= tolerance, (pixel, expected)


def assert_analyzable(bundle, loaded):
    analysis = analyze(bundle, loaded)
    assert analysis.grid == (14, 14)
    assert analysis.probs.sum() == pytest.approx(1.0, abs=1e-4)
    assert np.isfinite(analysis.rollout()).all()
    return analysis


# ---- unreadable files -----------------------------------------------------------------------------------


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ImageLoadError, match="Not an image"):
        load_image(path)


def test_text_file_is_refused(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n" * 20)
    with pytest.raises(ImageLoadError, match="Not an image"):
        load_image(str(path))


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "missing.jpg")


def test_truncated_jpeg_is_refused(tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="Could not read"):
        load_image(path)


def test_no_image_is_refused():
    with pytest.raises(ImageLoadError, match="No image"):
        load_image(None)


def test_too_many_pixels_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (20001, 20001)).save(path)  # 1-bit keeps the test file small; the pixel count is the point
    assert 20001 * 20001 > config.MAX_FILE_PIXELS
    with pytest.raises(ImageLoadError, match="pixels"):
        load_image(path)


# ---- modes ------------------------------------------------------------------------------------------------


def test_grayscale(tmp_path, deit_tiny):
    path = tmp_path / "gray.png"
    Image.fromarray(np.tile(np.arange(0, 256, 2, dtype=np.uint8), (96, 1)), "L").save(path)
    loaded = load_image(path)
    assert loaded.image.mode == "RGB" and loaded.image.size == (128, 96)
    r, g, b = loaded.image.getpixel((64, 10))
    assert r == g == b == 128
    assert_analyzable(deit_tiny, loaded)


def test_rgba_transparency_becomes_white(tmp_path, deit_tiny):
    image = Image.new("RGBA", (100, 80), (0, 0, 0, 0))  # fully transparent black
    image.paste((*RED, 255), (0, 0, 50, 80))
    path = tmp_path / "alpha.png"
    image.save(path)
    loaded = load_image(path)
    assert loaded.image.mode == "RGB"
    assert loaded.image.getpixel((10, 10)) == RED
    assert loaded.image.getpixel((90, 10)) == WHITE  # a plain convert("RGB") would give black
    assert_analyzable(deit_tiny, loaded)


def test_cmyk_jpeg(tmp_path, deit_tiny):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (120, 90), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    loaded = load_image(path)
    assert loaded.image.mode == "RGB"
    assert_close_colour(loaded.image.getpixel((60, 45)), RED)
    assert_analyzable(deit_tiny, loaded)


def test_16_bit_png_is_stretched_not_clipped(tmp_path, deit_tiny):
    ramp = np.tile(np.linspace(0, 4000, 200).astype(np.uint16), (50, 1))  # far below 65535, far above 255
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    loaded = load_image(path)
    gray = np.asarray(loaded.image)[..., 0]
    assert gray.min() == 0 and gray.max() == 255
    assert 100 < gray[25, 100] < 155  # the middle of the ramp is mid-grey, not saturated white
    assert_analyzable(deit_tiny, loaded)


def test_palette_transparency_becomes_white(tmp_path, deit_tiny):
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, *BLUE] + [0] * (254 * 3))
    image.paste(1, (0, 0, 32, 64))
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    loaded = load_image(path)
    assert loaded.image.getpixel((10, 10)) == BLUE
    assert loaded.image.getpixel((50, 10)) == WHITE
    assert_analyzable(deit_tiny, loaded)


def test_exif_rotation_is_applied(tmp_path, deit_tiny):
    image = Image.new("RGB", (300, 200), BLUE)
    image.paste(RED, (0, 0, 150, 200))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert loaded.image.size == (200, 300)
    assert loaded.original_size == (200, 300)
    assert_close_colour(loaded.image.getpixel((100, 60)), RED)  # the left half is now on top
    assert_close_colour(loaded.image.getpixel((100, 240)), BLUE)
    assert_analyzable(deit_tiny, loaded)


def test_animated_gif_uses_the_first_frame(tmp_path, deit_tiny):
    frames = [Image.new("RGB", (80, 60), colour) for colour in (RED, BLUE, BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    loaded = load_image(path)
    assert loaded.image.size == (80, 60)
    assert_close_colour(loaded.image.getpixel((40, 30)), RED)
    assert_analyzable(deit_tiny, loaded)


def test_bytes_and_arrays_are_accepted():
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), RED).save(buffer, "PNG")
    assert load_image(buffer.getvalue()).image.getpixel((5, 5)) == RED
    array = np.zeros((20, 30, 4), dtype=np.uint8)  # RGBA array, fully transparent
    assert load_image(array).image.getpixel((5, 5)) == WHITE


# ---- extreme sizes ----------------------------------------------------------------------------------------


def test_one_pixel_image_gives_the_result_of_its_colour(tmp_path, deit_tiny):
    """1x1 works: the processor stretches it to a flat image, so it must classify like any flat image."""
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (200, 40, 40)).save(path)
    analysis = assert_analyzable(deit_tiny, load_image(path))
    flat = predict(deit_tiny, Image.new("RGB", (224, 224), (200, 40, 40)))
    np.testing.assert_allclose(analysis.probs, flat, atol=1e-4)


def test_extreme_strip_is_refused_clearly(tmp_path):
    """1x4000: refused (resizing its short side to the model's size would make a gigantic image)."""
    path = tmp_path / "strip.png"
    Image.new("RGB", (1, 4000), RED).save(path)
    with pytest.raises(ImageLoadError, match="aspect ratio"):
        load_image(path)


def test_very_large_jpeg_is_downscaled(tmp_path, deit_tiny):
    image = Image.linear_gradient("L").resize((9000, 7000)).convert("RGB")
    path = tmp_path / "large.jpg"
    image.save(path, quality=80)
    del image
    loaded = load_image(path)
    assert loaded.original_size == (9000, 7000)
    assert max(loaded.image.size) <= config.MAX_IMAGE_SIDE
    assert loaded.image.width / loaded.image.height == pytest.approx(9000 / 7000, rel=0.01)
    assert loaded.scale == pytest.approx(loaded.image.width / 9000)
    analysis = assert_analyzable(deit_tiny, loaded)
    x0, y0, x1, y1 = analysis.geometry.to_original(analysis.geometry.view_box())
    assert 0 <= x0 < x1 <= 9000 + 1e-6 and 0 <= y0 < y1 <= 7000 + 1e-6
    assert x1 - x0 > 7000  # the centre crop of a 9000x7000 image spans most of its width


# ---- memory: bounded by what decoding costs, not by file size ---------------------------------------------


def write_png(path, width, height, bit_depth=8, color_type=0):
    """A PNG of zeros, compressed row by row: at most a megabyte or so on disk, whatever size it declares."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]  # grey, RGB, grey+alpha, RGBA
    row = bytes(1 + (width * channels * bit_depth + 7) // 8)  # filter byte, then the row's samples
    packer = zlib.compressobj(1)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


# Runs in a fresh process and reads the kernel's counters, which see C allocations (Pillow, numpy) that
# tracemalloc misses. VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would report the forking pytest's
# size. The loads run in a worker thread, as in the app, twice: glibc keeps freed pages in that thread's arena
# unless load_image hands them back.
MEASURE = """
import json, sys, threading
from zoomvit.images import load_image

def status_mb(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":")) / 1024

sizes = []
baseline = status_mb("VmRSS")
worker = threading.Thread(target=lambda: [sizes.append(load_image(sys.argv[1]).image.size) for _ in "ab"])
worker.start()
worker.join()
print(json.dumps({"peak": status_mb("VmHWM") - baseline, "after": status_mb("VmRSS") - baseline, "sizes": sizes}))
"""


def measure_load(path):
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "name, size, bit_depth, color_type",
    [
        ("16-bit grey 12000x12000, as reported", (12000, 12000), 16, 0),
        ("grey + alpha", (9000, 9000), 8, 4),
    ],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_declared_huge_png_loads_within_its_decode_cost(tmp_path, name, size, bit_depth, color_type):
    """Peak memory is the decode itself plus small strips (it was 4.5 GB); freed memory goes back to the OS."""
    path = write_png(tmp_path / "huge.png", *size, bit_depth, color_type)
    assert path.stat().st_size < 2 * MB
    with Image.open(path) as header:
        cost = decode_cost(header) / MB
    assert cost <= config.MAX_DECODE_BYTES / MB
    used = measure_load(path)
    assert used["sizes"] == [[config.MAX_IMAGE_SIDE] * 2] * 2
    assert used["peak"] < cost + 128, (name, cost, used)  # conversion works on strips, never a full-size copy
    assert used["after"] < 64, (name, used)  # back near the baseline once the image is gone


@pytest.mark.parametrize(
    "name, size, bit_depth, color_type",
    [
        ("8-bit RGB, 576 MB decoded", (12000, 12000), 8, 2),
        ("16-bit RGBA, decoded at 8 bits, 576 MB", (12000, 12000), 16, 6),
        ("RGB just past the budget", (10001, 10000), 8, 2),
    ],
)
def test_decode_above_the_budget_is_refused_from_the_header(tmp_path, name, size, bit_depth, color_type):
    path = write_png(tmp_path / "bomb.png", *size, bit_depth, color_type)
    assert size[0] * size[1] <= config.MAX_FILE_PIXELS  # within the pixel limit: only the decode cost refuses it
    started = time.perf_counter()
    with pytest.raises(ImageLoadError, match=r"too large to decode: .* the limit is"):
        load_image(path)
    assert time.perf_counter() - started < 1.0, name  # refused before decoding


def test_webp_is_costed_with_its_decoder_copies(tmp_path):
    """libwebp holds its own full-size canvases: a 5000x5000 WebP needs ~450 MB, not its 100 MB of pixels."""
    path = tmp_path / "big.webp"
    Image.new("RGB", (5000, 5000), RED).save(path, lossless=True)
    with pytest.raises(ImageLoadError, match="too large to decode"):
        load_image(path)
    small = tmp_path / "small.webp"
    Image.new("RGB", (3000, 2000), RED).save(small, lossless=True)
    assert load_image(small).image.getpixel((5, 5)) == RED
