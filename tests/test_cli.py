"""The zoomvit command, in-process through cli.main and once as the installed console script."""

import csv
import json
import os
import re
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zoomvit import cli, config, images, intent, models, visualization, zoom
from zoomvit.errors import ZoomViTError
from zoomvit.maps import top_mass_patches
from zoomvit.models import match_label
from zoomvit.vit_analyzer import MAP_METHODS, analyze, predict


@pytest.fixture(scope="module")
def photo(shared_dir) -> str:
    return str(shared_dir / "data" / "imagenet-sample" / "n01440764_tench.JPEG")


def run_json(capsys, *argv):
    assert cli.main(list(argv)) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, "--json prints exactly one line: one JSON object"
    return json.loads(out)


def check_predictions(predictions):
    probs = [p["prob"] for p in predictions]
    assert set(predictions[0]) == {"index", "label", "prob"}
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_explain_json(capsys, deit_tiny, deit_model_path, photo):
    result = run_json(capsys, "explain", photo, "--model", deit_model_path, "--json")
    assert {"top", "grid", "map", "intent", "target", "method"} <= set(result)
    check_predictions(result["top"])
    assert result["top"][0]["index"] == int(predict(deit_tiny, photo).argmax())
    assert result["target"]["index"] == result["top"][0]["index"]
    assert result["grid"] == [14, 14]
    heat = np.array(result["map"])
    assert heat.shape == (14, 14) and heat.min() >= 0 and heat.max() == 1
    assert result["intent"]["kind"] in intent.KINDS and result["intent"]["reason"]


def test_explain_in_bfloat16_on_the_cpu(capsys, deit_tiny, deit_model_path, photo):
    result = run_json(
        capsys, "explain", photo, "--model", deit_model_path, "--device", "cpu", "--dtype", "bfloat16", "--json"
    )
    assert result["model"]["device"] == "cpu" and result["model"]["dtype"] == "bfloat16"
    check_predictions(result["top"])
    assert result["top"][0]["index"] == int(predict(deit_tiny, photo).argmax())
    heat = np.array(result["map"])
    assert heat.shape == (14, 14) and heat.min() >= 0 and heat.max() == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["explain", "IMAGE", "--device", "tpu"], "Unknown device 'tpu': use auto, cpu, cuda, cuda:N or mps "),
        (["zoom", "IMAGE", "--dtype", "float64"], "Unknown dtype 'float64': use float32, bfloat16, float16 "),
        (["prune", "IMAGE", "--device", "cpu", "--dtype", "float16"], "float16 runs on a GPU only (cuda or mps); "),
        (["eval", "--data", "DATA", "--device", "tpu"], "Unknown device 'tpu'"),
        (["serve", "--port", "0", "--device", "tpu"], "Unknown device 'tpu'"),
    ],
)
def test_a_bad_device_or_dtype_is_one_line_and_status_2_before_anything_loads(
    capsys, monkeypatch, shared_dir, deit_model_path, photo, argv, message
):
    for module, step in ((images, "load_image"), (models, "read_model_config"), (models, "load_model")):
        monkeypatch.setattr(module, step, lambda *a, **k: pytest.fail("checked only after loading"))
    app_stub = types.ModuleType("app")
    app_stub.main = lambda argv: pytest.fail("the app was started")
    monkeypatch.setitem(sys.modules, "app", app_stub)
    folders = {"IMAGE": photo, "DATA": str(shared_dir / "data" / "imagenet-sample")}
    assert cli.main([folders.get(a, a) for a in argv] + ["--model", deit_model_path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"zoomvit: error: {message}")


def test_device_and_dtype_default_to_the_environment(capsys, monkeypatch, deit_model_path, photo):
    monkeypatch.setattr(images, "load_image", lambda *a, **k: pytest.fail("checked only after loading"))
    monkeypatch.setenv("ZOOMVIT_DTYPE", "float16")
    assert cli.main(["explain", photo, "--model", deit_model_path, "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("zoomvit: error: float16 runs on a GPU only")
    monkeypatch.setenv("ZOOMVIT_DEVICE", "tpu")
    assert cli.main(["explain", photo, "--model", deit_model_path, "--dtype", "float32"]) == 2
    assert capsys.readouterr().err.startswith("zoomvit: error: Unknown device 'tpu'")


def test_explain_for_another_class_by_label(capsys, deit_tiny, deit_model_path, photo):
    args = ["explain", photo, "--model", deit_model_path, "--json", "--method", "grad_rollout"]
    predicted = run_json(capsys, *args)
    other = run_json(capsys, *args, "--target", "goldfish")
    assert other["target"]["index"] == deit_tiny.find_label("goldfish") == 1
    expected = analyze(deit_tiny, photo).grad_rollout(1)
    np.testing.assert_allclose(other["map"], expected, atol=1e-4)
    assert not np.allclose(other["map"], predicted["map"], atol=1e-2)


def test_explain_summary_and_overlay(capsys, monkeypatch, deit_model_path, photo, tmp_path):
    monkeypatch.setenv(config.MODEL_ENV_VAR, deit_model_path)  # the default model comes from the environment
    out_png = tmp_path / "heat.png"
    assert cli.main(["explain", photo, "--method", "cls", "--block", "6", "--head", "max", "--out", str(out_png)]) == 0
    captured = capsys.readouterr()
    assert "tench" in captured.out and "intent:" in captured.out
    picture, original = Image.open(out_png), Image.open(photo)
    # The overlay at the image's size, then the colour bar and the caption below it, as the app's export.
    assert picture.width == original.width and picture.height > original.height + 40


def test_explain_writes_the_compare_sheets_with_captions(capsys, deit_tiny, deit_model_path, photo, tmp_path):
    from zoomvit import compare, visualization

    paths = {name: tmp_path / f"{name}.png" for name in ("out", "compare", "strip", "heads")}
    argv = ["explain", photo, "--model", deit_model_path, "--method", "grad_rollout", "--block", "4"]
    for name, path in paths.items():
        argv += [f"--{name}", str(path)]
    assert cli.main(argv) == 0
    assert capsys.readouterr().err.count("wrote ") == 4
    analysis = analyze(deit_tiny, photo)
    expected = {
        "compare": compare.map_tiles(analysis, block=3, selected="grad_rollout").image,
        "strip": compare.block_strip(analysis, "grad_rollout", selected=3).image,
        "heads": compare.heads_grid(analysis, block=3).image,
    }
    for name, sheet in expected.items():
        saved = np.asarray(Image.open(paths[name]).convert("RGB"))
        top = saved[: sheet.height]
        assert saved.shape[1] == sheet.width and saved.shape[0] > sheet.height, name  # a legend below the sheet
        assert np.abs(top.astype(int) - np.asarray(sheet.convert("RGB")).astype(int)).max() <= 1, name
    strip = compare.block_strip(analysis, "grad_rollout", selected=3)
    assert len(strip.names) == deit_tiny.num_layers
    # The caption is drawn: the rows under the sheet and its colour bar are not blank.
    legend = np.asarray(visualization.figure_with_legend(expected["heads"], "jet", "x").convert("L"))
    assert legend[expected["heads"].height :].min() < 128


@pytest.mark.parametrize("block, layer", [("1", 0), ("12", 11), ("-1", 11)])
def test_blocks_are_numbered_from_1(capsys, deit_tiny, deit_model_path, photo, block, layer):
    result = run_json(
        capsys, "explain", photo, "--model", deit_model_path, "--json", "--method", "cls", "--block", block
    )
    expected = analyze(deit_tiny, photo).cls_map(layer)
    np.testing.assert_allclose(result["map"], expected, atol=1e-4)


def test_summary_does_not_credit_a_class_agnostic_map_to_the_class(capsys, deit_tiny, deit_model_path, photo):
    analysis = analyze(deit_tiny, photo)
    assert cli.main(["explain", photo, "--model", deit_model_path, "--method", "rollout", "--target", "goldfish"]) == 0
    line = capsys.readouterr().out.splitlines()[-2]
    patches = int(top_mass_patches(analysis.rollout()).sum())
    assert line.startswith("rollout map (class-agnostic: the same for every class, so --target does not change it)")
    assert f"60% of its mass lies in {patches} of 196 patches" in line and "strongest" not in line

    assert (
        cli.main(["explain", photo, "--model", deit_model_path, "--method", "grad_rollout", "--target", "goldfish"])
        == 0
    )
    line = capsys.readouterr().out.splitlines()[-2]
    patches = int(top_mass_patches(analysis.grad_rollout(1)).sum())
    assert line.startswith("grad_rollout map for class 'goldfish, Carassius auratus'")
    assert f"60% of its mass lies in {patches} of 196 patches" in line


def test_prune_json(capsys, deit_model_path, photo, tmp_path):
    out_png = tmp_path / "tokens.png"
    result = run_json(
        capsys, "prune", photo, "--model", deit_model_path, "--keep", "0.5", "--json", "--out", str(out_png)
    )
    assert (result["tokens_before"], result["tokens_after"]) == (197, 99)
    assert 0.6 < result["macs_after"] / result["macs_before"] < 0.85  # half the blocks on half the tokens
    assert np.array(result["kept_mask"]).shape == (14, 14) and np.sum(result["kept_mask"]) == 98
    assert result["latency_before_ms"] > 0 and result["latency_after_ms"] > 0
    check_predictions(result["before"])
    check_predictions(result["after"])
    assert out_png.is_file()


def test_zoom_reports_the_box_in_original_pixels(capsys, shared_dir, deit_tiny, deit_model_path, tmp_path):
    """A zoom-bench composite at 10x its size is downscaled on load; the box must still be in the file's pixels."""
    folder = shared_dir / "data" / "zoom-bench"
    with open(folder / "labels.csv", newline="") as f:
        row = next(csv.DictReader(f))
    small = Image.open(folder / row["file"])
    big_path = tmp_path / "big.jpg"
    small.resize((small.width * 10, small.height * 10), Image.Resampling.BICUBIC).save(big_path, quality=95)
    out_png = tmp_path / "box.png"

    result = run_json(capsys, "zoom", str(big_path), "--model", deit_model_path, "--json", "--out", str(out_png))
    assert {"before", "after", "box", "zoomed", "reason"} <= set(result)
    assert isinstance(result["zoomed"], bool) and result["reason"]
    check_predictions(result["before"])
    check_predictions(result["after"])

    analysis = analyze(deit_tiny, big_path)
    expected = zoom.zoom(analysis)
    np.testing.assert_allclose(result["box"], expected.box, atol=0.051)
    assert result["zoomed"] == expected.zoomed
    box = np.array(result["box"])
    truth = 10 * np.array([float(row[k]) for k in ("x0", "y0", "x1", "y1")])
    # The object lies beyond the working image's width: only a box in original pixels can overlap it.
    assert truth[0] > analysis.loaded.image.width
    assert box[0] < truth[2] and truth[0] < box[2] and box[1] < truth[3] and truth[1] < box[3]
    saved = Image.open(out_png)  # the working image with the box, then the caption below it
    assert saved.width == analysis.loaded.image.width and saved.height > analysis.loaded.image.height


def test_unreadable_image_exits_2_with_one_line(capsys, deit_model_path, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00garbage" * 100)
    assert cli.main(["explain", str(bad), "--model", deit_model_path]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoomvit: error: ") and "Traceback" not in captured.err


def test_unknown_class_exits_2(capsys, deit_model_path, photo):
    assert cli.main(["explain", photo, "--model", deit_model_path, "--target", "no such animal"]) == 2
    assert capsys.readouterr().err.strip() == "zoomvit: error: No class label matches 'no such animal'."


def test_missing_model_folder_exits_2(capsys, photo, tmp_path):
    assert cli.main(["prune", photo, "--model", str(tmp_path / "missing-model")]) == 2
    assert capsys.readouterr().err.startswith("zoomvit: error: Model folder not found")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune", "--keep", "1.5"], "--keep must be a fraction in (0, 1], got 1.5."),
        (["prune", "--keep", "0"], "--keep must be a fraction in (0, 1], got 0."),
        (["explain", "--discard-ratio", "1"], "--discard-ratio must be from 0 to 0.95, got 1."),
        (["explain", "--discard-ratio", "0.99"], "--discard-ratio must be from 0 to 0.95, got 0.99."),  # the app's cap
    ],
)
def test_option_ranges_are_checked_first(capsys, monkeypatch, deit_model_path, photo, argv, message):
    for module, step in ((images, "load_image"), (models, "load_model")):
        monkeypatch.setattr(module, step, lambda *a, **k: pytest.fail("checked only after reading the image"))
    assert cli.main([*argv[:1], photo, "--model", deit_model_path, *argv[1:]]) == 2
    assert capsys.readouterr().err == f"zoomvit: error: {message}\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["explain", "IMAGE", "--target", "xyzzy"], "No class label matches 'xyzzy'."),
        (["explain", "IMAGE", "--target", "fish"], "'fish' matches 11 labels (e.g. goldfish, Carassius auratus, "),
        (["explain", "IMAGE", "--block", "13"], "--block must be in 1..12 (or -1 for the last), got 13."),
        (["explain", "IMAGE", "--block", "0"], "--block must be in 1..12 (or -1 for the last), got 0."),
        (["prune", "IMAGE", "--after-block", "12"], "--after-block must be in 1..11 (after the last block, 12, "),
        (["prune", "IMAGE", "--after-block", "0"], "--after-block must be in 1..11 "),
        (["eval", "--data", "DATA", "--after-block", "12"], "--after-block must be in 1..11 "),
    ],
)
def test_options_are_checked_against_config_json_before_the_model_loads(
    capsys, monkeypatch, shared_dir, deit_model_path, photo, argv, message
):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    folders = {"IMAGE": photo, "DATA": str(shared_dir / "data" / "imagenet-sample")}
    assert cli.main([folders.get(a, a) for a in argv] + ["--model", deit_model_path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"zoomvit: error: {message}")


def test_match_label_reads_config_json_labels(deit_tiny):
    as_json = {str(i): name for i, name in deit_tiny.id2label.items()}  # config.json keys are strings
    for text in ("goldfish", "Tench", "7", "great white shark"):
        assert match_label(as_json, text) == deit_tiny.find_label(text)
    # a number that is not an index (an API's float) names no class: "nan" was a substring of "banana"
    for text in ("NaN", "nan", "inf", "2.5", "1e3"):
        with pytest.raises(ZoomViTError, match=f"'{text}' is not a class: give a class index"):
            match_label(as_json, text)


def test_pruning_after_the_last_block_is_refused(tiny_vit):
    """Nothing runs after the last block, so there is nothing to prune: it used to report 197 -> 99 tokens."""
    from zoomvit import pruning

    analysis = analyze(tiny_vit, np.zeros((32, 48, 3), dtype=np.uint8))
    for after_block in (0, tiny_vit.num_layers):
        with pytest.raises(ZoomViTError, match=r"Prune after block must be in 1\.\.1 \(after the last block, 2, "):
            pruning.prune(analysis, 0.5, after_block, timing_repeats=0)


def test_help_imports_no_library(tmp_path):
    """--help builds the parser only: no torch, transformers, gradio or numpy (each costs seconds to import)."""
    code = (
        "import json, sys\nfrom zoomvit import cli\n"
        "for argv in (['--help'], ['explain', '--help'], ['serve', '--help']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, argv\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    assert "--block B" in done.stdout or "--block BLOCK" in done.stdout
    assert "--device DEVICE" in done.stdout and "--dtype DTYPE" in done.stdout
    heavy = {
        "torch",
        "transformers",
        "gradio",
        "numpy",
        "PIL",
        "huggingface_hub",
        "zoomvit.vit_analyzer",
        "zoomvit.evaluation.runner",
        "zoomvit.app.ui",
    }
    assert heavy.isdisjoint(json.loads(done.stderr.splitlines()[-1]))


def test_cli_choices_match_the_library():
    from zoomvit import pruning
    from zoomvit.evaluation import runner as evaluation

    assert config.MAP_METHODS == MAP_METHODS and config.ZOOM_POLICIES == zoom.POLICIES
    assert (config.PRUNE_MODES, config.PRUNE_FUSIONS) == (pruning.MODES, pruning.FUSIONS)
    assert (config.EVAL_TASKS, config.EVAL_KEEPS) == (evaluation.TASKS, evaluation.DEFAULT_KEEPS)


def test_port_free():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert not cli.port_free("127.0.0.1", port)
    assert cli.port_free("127.0.0.1", port)


def test_serve_on_a_busy_port_exits_2_before_loading(capsys, monkeypatch, deit_model_path):
    app_stub = types.ModuleType("app")
    app_stub.main = lambda argv: pytest.fail("the app was started")
    monkeypatch.setitem(sys.modules, "app", app_stub)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--port", str(port), "--model", deit_model_path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"zoomvit: error: Cannot serve on 127.0.0.1:{port}: the port is in use"
    )


def test_usage_errors_exit_2(capsys, photo):
    with pytest.raises(SystemExit) as exc:
        cli.main(["prune", photo, "--mode", "bogus"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script(deit_tiny, deit_model_path, photo):
    script = Path(sys.executable).with_name("zoomvit")
    assert script.is_file(), f"{script} is missing: install the project with pip install -e ."
    done = subprocess.run(
        [str(script), "explain", photo, "--model", deit_model_path, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # as in conftest: no thread contention on 2 cores
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["top"][0]["index"] == int(predict(deit_tiny, photo).argmax())
    assert result["grid"] == [14, 14]


# ---- issue 17: ports, ignored options, settings in --json, prune timings, --help ----------------------------------


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "0"])
def test_serve_refuses_a_port_out_of_range_before_anything_loads(capsys, monkeypatch, deit_model_path, port):
    """99999 passed the bind test (getaddrinfo wraps it round) and crashed after the model load; -1 was 'in use'."""
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    app_stub = types.ModuleType("app")
    app_stub.main = lambda argv: pytest.fail("the app was started")
    monkeypatch.setitem(sys.modules, "app", app_stub)
    assert cli.main(["serve", "--port", port, "--model", deit_model_path]) == 2
    assert capsys.readouterr().err == f"zoomvit: error: --port must be a port number in 1..65535, got {port}.\n"
    assert not cli.port_free("127.0.0.1", int(port))


def run_json_and_notes(capsys, *argv):
    """(the JSON object on stdout, the lines on stderr after the two that say what the command is doing)."""
    assert cli.main(list(argv)) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1
    model, image = argv[argv.index("--model") + 1], argv[1]
    progress, notes = captured.err.splitlines()[:2], captured.err.splitlines()[2:]
    assert progress == [f"zoomvit: loading model {model} ...", f"zoomvit: analysing {image} ..."]
    return json.loads(captured.out), notes


@pytest.mark.parametrize(
    "options, note, settings",
    [
        ([], None, {"method": config.DEFAULT_VIEW, "block": None, "head": None, "discard_ratio": None}),
        (
            ["--method", "grad_rollout", "--block", "3", "--head", "max", "--discard-ratio", "0.5"],
            "--block, --head and --discard-ratio do not apply to grad_rollout maps; ignored.",
            {"method": "grad_rollout", "block": None, "head": None, "discard_ratio": None},
        ),
        (
            ["--method", "cls", "--block", "3", "--head", "2", "--target", "goldfish", "--discard-ratio", "0.5"],
            "--discard-ratio and --target do not apply to cls maps (class-agnostic: the same for every class); "
            "ignored.",
            {"method": "cls", "block": 3, "head": 2, "discard_ratio": None},
        ),
        (
            ["--method", "rollout", "--block", "12", "--head", "max"],
            "--block does not apply to rollout maps; ignored.",
            {"method": "rollout", "block": None, "head": "max", "discard_ratio": config.ROLLOUT_DISCARD_RATIO},
        ),
    ],
)
def test_explain_notes_ignored_options_and_echoes_every_setting(
    capsys, deit_model_path, photo, options, note, settings
):
    result, err = run_json_and_notes(
        capsys,
        "explain",
        photo,
        "--model",
        deit_model_path,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--json",
        *options,
    )
    assert err == ([f"zoomvit: note: {note}"] if note else [])
    assert {key: result[key] for key in settings} == settings
    target = 1 if "--target" in options else result["top"][0]["index"]
    assert result["target"]["index"] == target
    assert result["model"] == {
        "name": deit_model_path,
        "family": result["model"]["family"],
        "device": "cpu",
        "dtype": "float32",
    }


def test_prune_and_zoom_notes_and_settings_in_json(capsys, deit_model_path, photo):
    result, err = run_json_and_notes(
        capsys,
        "prune",
        photo,
        "--model",
        deit_model_path,
        "--mode",
        "analysis",
        "--fusion",
        "fuse",
        "--keep",
        "0.5",
        "--after-block",
        "4",
        "--json",
    )
    assert err == ["zoomvit: note: --fusion does not apply to --mode analysis; ignored."]
    assert (result["mode"], result["keep"], result["after_block"], result["fusion"]) == ("analysis", 0.5, 4, None)
    assert result["model"]["name"] == deit_model_path and {"device", "dtype"} <= set(result["model"])
    result, err = run_json_and_notes(
        capsys, "prune", photo, "--model", deit_model_path, "--mode", "efficiency", "--json"
    )
    assert err == [] and (result["mode"], result["fusion"]) == ("efficiency", "merge")
    result, err = run_json_and_notes(capsys, "zoom", photo, "--model", deit_model_path, "--policy", "always", "--json")
    assert err == [] and result["policy"] == "always" and result["model"]["name"] == deit_model_path


def test_prune_prints_the_timing_ranges_and_whether_they_overlap(capsys, deit_model_path, photo):
    from zoomvit import pruning

    assert cli.main(["prune", photo, "--model", deit_model_path]) == 0
    out = capsys.readouterr().out
    # the decision from and to, as the app's caption says it (vit_analyzer.decision_change)
    assert re.search(r"^decision (kept|changed): tench, Tinca tinca \(0\.\d\d", out, re.MULTILINE), out
    timing = r"([\d.]+) ms \(([\d.]+)–([\d.]+)\)"
    found = re.search(
        rf"^time: {timing} -> {timing}, median \(range\) of (\d+) interleaved runs each; (.*)$", out, re.MULTILINE
    )
    assert found, out
    for median, low, high in (found.group(1, 2, 3), found.group(4, 5, 6)):
        assert float(low) <= float(median) <= float(high)
    assert int(found[7]) == pruning.TIMING_REPEATS >= 5
    overlap = float(found[5]) <= float(found[3]) and float(found[2]) <= float(found[6])
    assert found[8] == (
        "the ranges overlap: the difference is within the timing noise"
        if overlap
        else f"every pruned run was {'faster' if float(found[6]) < float(found[2]) else 'slower'} "
        "than every unpruned run"
    )


@pytest.mark.parametrize(
    "before, after, within_noise, verdict",
    [
        ([326, 300, 340], [1068, 310, 500], True, "the ranges overlap: the difference is within the timing noise"),
        ([30, 31, 35], [20, 22, 29], False, "every pruned run was faster than every unpruned run"),
        ([30, 31, 35], [36, 40, 41], False, "every pruned run was slower than every unpruned run"),
        ([], [], False, "not timed"),
    ],
)
def test_prune_result_says_whether_the_timings_differ(tiny_vit, before, after, within_noise, verdict):
    import dataclasses

    from zoomvit import pruning

    result = pruning.prune(analyze(tiny_vit, np.zeros((32, 48, 3), dtype=np.uint8)), 0.5, 1, timing_repeats=0)
    result = dataclasses.replace(
        result,
        latency_before_runs=before,
        latency_after_runs=after,
        latency_before_ms=float(np.median(before)) if before else float("nan"),
        latency_after_ms=float(np.median(after)) if after else float("nan"),
    )
    assert result.latency_within_noise == within_noise and result.latency_verdict() == verdict
    assert result.as_dict()["latency_within_noise"] == within_noise
    if before:
        assert result.latency_text("before") == f"{np.median(before):.1f} ms ({min(before):.1f}–{max(before):.1f})"


@pytest.mark.parametrize(
    "command, option, default",
    [
        ("explain", "--method", config.DEFAULT_VIEW),
        ("zoom", "--policy", config.ZOOM_POLICY),
        ("prune", "--mode", "analysis"),
        ("prune", "--keep", "0.5"),
        ("serve", "--host", "127.0.0.1"),
        ("serve", "--port", "7860"),
    ],
)
def test_help_explains_each_option_and_its_default(capsys, command, option, default):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    sub = cli.build_parser()._subparsers._group_actions[0].choices[command]
    action = next(a for a in sub._actions if option in a.option_strings)
    assert action.help and action.help.endswith("(default: %(default)s)")
    assert f"(default: {default})" in text


def test_heads_are_numbered_from_one_in_the_cli_as_blocks_are(capsys, deit_model_path, deit_tiny, photo):
    """--head 1 is the first head (the library's index 0), -1 the last, and the JSON echoes the head's number."""
    analysis = analyze(deit_tiny, photo)
    for head, index, echoed in (("1", 0, 1), ("-1", 2, 3)):
        assert (
            cli.main(["explain", photo, "--model", deit_model_path, "--method", "cls", "--head", head, "--json"]) == 0
        )
        out = json.loads(capsys.readouterr().out)
        assert out["head"] == echoed
        assert np.allclose(out["map"], analysis.cls_map(-1, index), atol=1e-4)
    assert cli.main(["explain", photo, "--model", deit_model_path, "--method", "cls", "--head", "0"]) == 2
    assert capsys.readouterr().err == (
        "zoomvit: error: --head must be in 1..3 (or -1 for the last), or mean, max or min; got 0.\n"
    )


def test_a_tiny_image_is_explained_with_a_warning_and_a_readable_picture(capsys, deit_model_path, tmp_path):
    """16x12 pixels: one warning line (far below the model's input), the picture enlarged so its colour bar and
    caption fit, and the zoom never crops less than one patch's pixels (here: the image's whole height)."""
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(tiny)
    out_png = tmp_path / "tiny-map.png"
    assert cli.main(["explain", str(tiny), "--model", deit_model_path, "--out", str(out_png)]) == 0
    err = capsys.readouterr().err
    assert "zoomvit: warning: This image is only 16×12 pixels, far below the model's 224×224 input" in err
    assert Image.open(out_png).width >= visualization.FIGURE_MIN_WIDTH
    result = run_json(capsys, "zoom", str(tiny), "--model", deit_model_path, "--json")
    for candidate in result["candidates"]:
        x0, y0, x1, y1 = candidate["box"]
        assert min(x1 - x0, y1 - y0) >= 12  # one 16-px patch, capped by the 12-px height
