"""`zoomvit eval`: the labels reader, the faithfulness batching, the summaries, and whole runs on DeiT-Tiny."""

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zoomvit import cli, faithfulness, visualization
from zoomvit.cli import evaluate as cli_evaluate
from zoomvit.errors import ZoomViTError
from zoomvit.evaluation import data as eval_data
from zoomvit.evaluation import pruning_pass
from zoomvit.evaluation import report as eval_report
from zoomvit.evaluation import runner as evaluation
from zoomvit.evaluation import tasks as eval_tasks
from zoomvit.evaluation import work as eval_work
from zoomvit.vit_analyzer import analyze, predict, predict_pixels

REPO = Path(__file__).resolve().parents[1]


def write_labels(folder: Path, header: str, *lines: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.csv").write_text("\n".join([header, *lines]) + "\n")
    return folder


# ---- labels.csv -------------------------------------------------------------------------------------------


def test_read_labels_with_and_without_boxes(tmp_path):
    plain = eval_data.read_labels(write_labels(tmp_path / "a", "file,label_index,synset", "x.jpg,3,n1", "y.jpg,4,n2"))
    assert [(i.file, i.label, i.box) for i in plain] == [("x.jpg", 3, None), ("y.jpg", 4, None)]
    boxed = eval_data.read_labels(
        write_labels(tmp_path / "b", "file,label_index,x0,y0,x1,y1,background", "z.jpg,7,1,2,30.5,40,blur"), limit=5
    )
    assert boxed[0].box == (1.0, 2.0, 30.5, 40.0) and boxed[0].groups == {"background": "blur"}
    assert len(eval_data.read_labels(tmp_path / "a", limit=1)) == 1


def test_every_kth_row_spreads_a_sample_over_a_class_sorted_list(tmp_path):
    rows = [f"{c}_{i}.jpg,{c}" for c in range(3) for i in range(4)]  # sorted by class, as CIFAR-10's
    folder = write_labels(tmp_path / "sorted", "file,label_index", *rows)
    assert [i.label for i in eval_data.read_labels(folder, limit=4)] == [0, 0, 0, 0]
    assert [i.file for i in eval_data.read_labels(folder, every=4)] == ["0_0.jpg", "1_0.jpg", "2_0.jpg"]
    assert [i.file for i in eval_data.read_labels(folder, limit=2, every=3)] == ["0_0.jpg", "0_3.jpg"]
    with pytest.raises(ZoomViTError, match="--every must be a whole number, at least 1, got 0"):
        eval_data.read_labels(folder, every=0)


@pytest.mark.parametrize(
    "header, line, message",
    [
        ("file,label", "x.jpg,3", "needs the columns file,label_index"),
        ("file,label_index,x0,y0", "x.jpg,3,1,2", "only some of the box columns"),
        ("file,label_index", "x.jpg,three", "line 2"),
        ("file,label_index", ",3", "empty file name"),
        ("file,label_index", "", "lists no images"),
    ],
)
def test_read_labels_rejects_bad_files(tmp_path, header, line, message):
    with pytest.raises(ZoomViTError, match=message):
        eval_data.read_labels(write_labels(tmp_path, header, line))


@pytest.mark.parametrize(
    "line, message",
    [
        ("x.jpg,three,1,2,30,40", "line 2: label_index must be a whole number, got 'three'."),
        ("x.jpg,3,1,2,abc,40", "line 2: x1 must be a finite number, got 'abc'."),
        ("x.jpg,3,nan,2,30,40", "line 2: x0 must be a finite number, got 'nan'."),
        ("x.jpg,3,0,0,inf,40", "line 2: x1 must be a finite number, got 'inf'."),  # every map peak would be in it
        ("x.jpg,3,1,2,30", "line 2: y1 must be a finite number, got nothing."),
        ("x.jpg,3,30,2,10,40", "line 2: x1 must be greater than x0, got x0 = '30' and x1 = '10'."),
        ("x.jpg,3,1,40,30,40", "line 2: y1 must be greater than y0, got y0 = '40' and y1 = '40'."),
    ],
)
def test_read_labels_names_the_bad_column_and_value(tmp_path, line, message):
    with pytest.raises(ZoomViTError, match=re.escape(message)):
        eval_data.read_labels(write_labels(tmp_path, "file,label_index,x0,y0,x1,y1", line))


def test_read_labels_encodings(tmp_path):
    """A byte order mark (as spreadsheets write it) is not part of the first column's name; a file in another
    encoding is refused in one line that names it."""
    (tmp_path / "labels.csv").write_bytes("\ufefffile,label_index\nx.jpg,3\n".encode())
    assert [(i.file, i.label) for i in eval_data.read_labels(tmp_path)] == [("x.jpg", 3)]
    (tmp_path / "labels.csv").write_bytes("file,label_index\nd\xe9j\xe0.jpg,3\n".encode("latin-1"))
    with pytest.raises(ZoomViTError, match=re.escape(f"{tmp_path / 'labels.csv'} is not UTF-8 text")):
        eval_data.read_labels(tmp_path)


def test_read_labels_missing_folder_and_file(tmp_path):
    with pytest.raises(ZoomViTError, match="not found"):
        eval_data.read_labels(tmp_path / "nope")
    with pytest.raises(ZoomViTError, match="labels.csv"):
        eval_data.read_labels(tmp_path)


def test_parse_keeps_and_tasks():
    assert eval_tasks.parse_keeps("0.9, 0.5,0.1") == (0.9, 0.5, 0.1)
    for bad in ("", "0", "1.5", "a,b"):
        with pytest.raises(ZoomViTError):
            eval_tasks.parse_keeps(bad)
    assert eval_tasks.parse_tasks("zoom,prune") == ("zoom", "prune")
    assert eval_tasks.parse_tasks("sanity") == ("sanity",) and "sanity" not in eval_tasks.DEFAULT_TASKS
    with pytest.raises(ZoomViTError, match="tasks"):
        eval_tasks.parse_tasks("zoom,speed")


def test_box_iou():
    assert evaluation.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert evaluation.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert evaluation.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


# ---- faithfulness batching --------------------------------------------------------------------------------


def test_batched_curves_match_one_image_at_a_time(tiny_vit):
    """Every map's curves from the one batched pass equal perturbing and classifying each image separately."""
    rng = np.random.default_rng(0)
    analysis = analyze(tiny_vit, rng.integers(0, 255, (32, 48, 3), dtype=np.uint8), keep_graph=False)
    maps = {"rollout": analysis.rollout(), "cls": analysis.cls_map(), "random": None}
    curves = faithfulness.perturbation_curves_many(analysis, maps, steps=4, seed=3)
    x = analysis.pixel_values
    h, w = x.shape[-2:]
    blurred = faithfulness._blur(x)
    prob = lambda image: predict_pixels(tiny_vit, image)[0, analysis.target]
    for name, grid_map in maps.items():
        order = faithfulness._order(analysis, grid_map, seed=3)
        for step, f in enumerate(np.linspace(0, 1, 5)):
            mask = torch.zeros(h * w)
            mask[order[: int(round(f * h * w))]] = 1
            mask = mask.view(1, 1, h, w)
            assert curves[name][0][step] == pytest.approx(prob(x * (1 - mask)), abs=1e-5), (name, step)
            assert curves[name][1][step] == pytest.approx(prob(blurred * (1 - mask) + x * mask), abs=1e-5)
    # The single-map form is the same computation.
    single = faithfulness.perturbation_curves(analysis, maps["rollout"], steps=4)
    np.testing.assert_allclose(single[0], curves["rollout"][0], atol=1e-6)
    assert faithfulness.auc(np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)


def test_a_group_of_images_gives_each_image_its_own_curves(tiny_vit):
    """Evaluation runs the perturbed images of a group of images together, in batches that straddle images: each
    image's curves are the ones it gets on its own."""
    rng = np.random.default_rng(1)
    analyses = [
        analyze(tiny_vit, rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), keep_graph=False) for _ in range(3)
    ]
    maps = [{"rollout": a.rollout(), "random": None} for a in analyses]
    together = faithfulness.perturbation_curves_group(analyses, maps, [5, 6, 7], steps=4, batch=5)
    for analysis, image_maps, seed, curves in zip(analyses, maps, [5, 6, 7], together):
        alone = faithfulness.perturbation_curves_many(analysis, image_maps, steps=4, seed=seed)
        for name in image_maps:
            for a, b in zip(alone[name], curves[name]):
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_pass_one_groups_are_fixed_runs_of_the_list():
    """Groups do not depend on what is already done (a resumed run batches images as an uninterrupted one);
    a group done in part is run again."""
    assert eval_work.groups_to_do(7, {}, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert eval_work.groups_to_do(7, {0: False, 1: True, 2: False, 3: False}, 3) == [[3, 4, 5], [6]]
    assert eval_work.groups_to_do(4, {i: False for i in range(4)}, 2) == []


# ---- summaries and plots ----------------------------------------------------------------------------------


def synthetic_summary():
    prune = [
        {
            "mode": m,
            "criterion": c,
            "keep": k,
            "top1": t - (1 - k) * d,
            "agreement": 0.9,
            "macs_ratio": 0.5 + k / 2,
            "latency_ratio": 0.45 + k / 2,
            "tokens_after": 10,
        }
        for m, crits in eval_tasks.CRITERIA.items()
        for c, d in zip(crits, (0.01, 0.05, 0.2))
        for k in (0.5, 0.3)
        for t in (0.8,)
    ]
    curve = list(np.linspace(0.8, 0.0, 11))
    faith = [
        {"method": m, "deletion_auc": a, "insertion_auc": 0.4, "deletion_curve": curve, "insertion_curve": curve}
        for m, a in zip(eval_tasks.FAITHFULNESS_METHODS, (0.18, 0.17, 0.19, 0.19, 0.12, 0.11))
    ]
    zoom = {
        "n": 10,
        "top1_before": 0.2,
        "top1_after": 0.6,
        "top1_crop": 0.5,
        "zoomed_fraction": 0.7,
        "pointing_game": 0.9,
        "box_iou": 0.4,
        "groups": {
            "background": {
                "blur": {
                    "n": 5,
                    "top1_before": 0.3,
                    "top1_after": 0.6,
                    "top1_crop": 0.5,
                    "zoomed_fraction": 1.0,
                    "pointing_game": 0.8,
                    "box_iou": 0.5,
                }
            }
        },
    }
    return {
        "model": "m",
        "data": "/x/zoom-bench",
        "n": 10,
        "top1": 0.8,
        "settings": {"after_block": 6, "prune_batch": 32},
        "prune": prune,
        "zoom": zoom,
        "faithfulness": faith,
        "skipped": [],
        "speed": {"analysis_ms_median": 50.0, "total_seconds": 60.0},
        "machine": {"threads": 2, "processor": "x86_64", "torch": "2"},
    }


def test_goal_checks_report_met_and_missed():
    checks = {goal: (measured, met) for goal, measured, met in eval_report.goal_checks(synthetic_summary())}
    keep3 = checks["analysis pruning, keep 0.3: top-1 drop <= 1 points"]
    assert keep3 == ("-0.7 points", True)  # top-1 0.8 - 0.7 * 0.01 against 0.8
    assert checks["efficiency keep 0.5: latency ratio <= MACs ratio + 0.05"][1] is True
    assert checks["top-1 after adaptive zoom >= 55%"] == ("60.0%", True)
    assert checks["blur items: top-1 after zoom >= 65%"] == ("60.0%", False)
    faith = checks["best map's deletion AUC <= rollout's - 3 points"]
    assert faith[1] is True and faith[0].startswith("intent 11.00 vs rollout 19.00")


def test_goal_checks_judge_the_printed_figures():
    """A drop of exactly 5 points is met though 100 x (0.85 - 0.9) is -5.000000000000004; so are a latency ratio
    and an AUC gap exactly at their limits."""
    summary = synthetic_summary()
    summary["top1"] = 0.9
    entries = {(e["mode"], e["criterion"], e["keep"]): e for e in summary["prune"]}
    entries["analysis", "intent", 0.3].update(keep=0.1, top1=0.85)  # the keep-0.1 goal: a drop of 5 points at most
    entries["efficiency", "merge", 0.3].update(macs_ratio=0.07, latency_ratio=0.12, top1=0.9)  # 0.07 + 0.05 > 0.12
    for e in summary["faithfulness"]:  # the best map 0.26, rollout 0.29: a gap of 2.9999999999999996
        e["deletion_auc"] = {"rollout": 0.29, "intent": 0.26}.get(e["method"], 0.28)
    checks = {goal: (measured, met) for goal, measured, met in eval_report.goal_checks(summary)}
    assert checks["analysis pruning, keep 0.1: top-1 drop <= 5 points"] == ("-5.0 points", True)
    assert checks["efficiency keep 0.3: latency ratio <= MACs ratio + 0.05"] == ("0.12 vs 0.07", True)
    faith_check = checks["best map's deletion AUC <= rollout's - 3 points"]
    assert faith_check[1] is True and faith_check[0].endswith("(3.00 points better)")


def test_an_untimed_run_says_latency_was_not_measured():
    """eval --no-timing leaves every latency ratio None: the table and the latency goals say "not measured"."""
    summary = synthetic_summary()
    summary["settings"]["timing"] = False
    for e in summary["prune"]:
        e["latency_ratio"] = None
    checks = {goal: (measured, met) for goal, measured, met in eval_report.goal_checks(summary)}
    assert checks["efficiency keep 0.5: latency ratio <= MACs ratio + 0.05"] == ("not measured", None)
    assert checks["analysis pruning, keep 0.3: top-1 drop <= 1 points"][1] is True  # the other goals still judged
    report = eval_report.markdown_report(summary)
    assert "latency not measured: --no-timing" in report and "latency at batch" not in report
    assert "| 0.75 | not measured |" in report  # keep 0.5's MACs ratio, then its latency
    assert "| efficiency keep 0.3: latency ratio <= MACs ratio + 0.05 | not measured | not measured |" in report


def test_zoom_plot_legend_covers_no_bar_or_value():
    """Bars near 100% fill the axes: the legend sits outside them, clear of every bar, value, label and the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    summary = synthetic_summary()
    for block in (summary["zoom"], *summary["zoom"]["groups"]["background"].values()):
        block.update(top1_before=0.97, top1_after=1.0, top1_crop=0.99)
    fig = visualization.plot_zoom(summary)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    (legend,) = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    box = legend.get_window_extent(renderer)
    ax = fig.axes[0]
    covered = [
        artist
        for artist in [*ax.patches, *ax.texts, ax.title, *ax.get_xticklabels(), *ax.get_yticklabels()]
        if artist.get_window_extent(renderer).overlaps(box)
    ]
    assert not covered
    assert len(ax.texts) == 6 and all(t.get_window_extent(renderer).y1 <= ax.bbox.y1 for t in ax.texts)


def test_report_and_plots_from_a_summary(tmp_path):
    summary = synthetic_summary()
    report = eval_report.markdown_report(summary)
    assert "| analysis | intent | 0.5 |" in report and "| rollout | 19.00 | 40.00 |" in report and "MISSED" in report
    for plot in (visualization.plot_pruning, visualization.plot_zoom, visualization.plot_faithfulness):
        path = tmp_path / f"{plot.__name__}.png"
        plot(summary).savefig(path)
        with Image.open(path) as image:
            assert image.width > 300 and image.height > 200


# ---- real runs on DeiT-Tiny -------------------------------------------------------------------------------

LIMIT = 6


@pytest.fixture(scope="module")
def bench_run(deit_tiny, shared_dir, tmp_path_factory):
    """Every task on the first images of zoom-bench (boxes, background and scale groups). One timing round instead
    of LATENCY_ROUNDS: the tests read the latency ratios' presence and sign, never their value."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pruning_pass, "LATENCY_ROUNDS", 1)
        result = evaluation.evaluate(deit_tiny, shared_dir / "data" / "zoom-bench", limit=LIMIT, progress=False)
    out = tmp_path_factory.mktemp("eval")
    return result, out, eval_report.write_outputs(result, out)


def test_run_writes_every_output(bench_run):
    result, out, written = bench_run
    assert {p.name for p in written} == {
        "results.json",
        "per_image.csv",
        "prune.png",
        "zoom.png",
        "faithfulness.png",
        "report.md",
    }
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(result.summary))
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == LIMIT and rows[0]["file"] == "zoom_0000.jpg"
    for name in ("prune.png", "zoom.png", "faithfulness.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"


def test_results_follow_the_schema(bench_run):
    s = bench_run[0].summary
    assert s["n"] == LIMIT and s["model"].endswith("deit-tiny-patch16-224")
    fractions = [s["top1"]]
    assert len(s["prune"]) == 6 * len(eval_tasks.DEFAULT_KEEPS)
    for e in s["prune"]:
        assert set(e) >= {"mode", "criterion", "keep", "top1", "agreement", "macs_ratio", "latency_ratio"}
        assert e["mode"] in ("analysis", "efficiency") and 0 < e["macs_ratio"] < 1 and e["latency_ratio"] > 0
        fractions += [e["top1"], e["agreement"]]
    z = s["zoom"]
    fractions += [z[k] for k in ("top1_before", "top1_after", "zoomed_fraction", "pointing_game", "box_iou")]
    assert set(z["groups"]) == {"background", "scale"}
    assert [e["method"] for e in s["faithfulness"]] == list(eval_tasks.FAITHFULNESS_METHODS)
    for e in s["faithfulness"]:
        fractions += [e["deletion_auc"], e["insertion_auc"]]
        assert len(e["deletion_curve"]) == faithfulness.STEPS + 1
    assert set(s["intent"]) == {"good", "inverted", "diffuse"}
    assert sum(g["n"] for g in s["intent"].values()) == LIMIT
    assert all(0.0 <= f <= 1.0 for f in fractions)


def test_results_agree_with_the_library(bench_run, deit_tiny, shared_dir):
    """The figures are what the library computes image by image: top-1 against the label, the zoom decision."""
    result = bench_run[0]
    folder = shared_dir / "data" / "zoom-bench"
    items = eval_data.read_labels(folder, LIMIT)
    predicted = [int(predict(deit_tiny, folder / item.file).argmax()) for item in items]
    assert [r["predicted"] for r in result.rows] == predicted
    assert result.summary["top1"] == pytest.approx(np.mean([p == i.label for p, i in zip(predicted, items)]))
    assert result.summary["zoom"]["top1_before"] == result.summary["top1"]
    # Analysis-mode pruning keeps ranked tokens: at keep 0.9 it must agree with the unpruned model far more
    # often than random pruning at keep 0.1 does.
    by_config = {(e["mode"], e["criterion"], e["keep"]): e for e in result.summary["prune"]}
    assert by_config[("analysis", "intent", 0.9)]["agreement"] > by_config[("analysis", "random", 0.1)]["agreement"]


def test_keep_one_changes_nothing(deit_tiny, shared_dir):
    result = evaluation.evaluate(
        deit_tiny, shared_dir / "data" / "imagenet-sample", limit=3, keeps=(1.0,), tasks=("prune",), progress=False
    )
    for e in result.summary["prune"]:
        assert e["agreement"] == 1.0 and e["macs_ratio"] == 1.0 and e["top1"] == result.summary["top1"]


def test_intent_map_beats_random_on_deletion(deit_tiny, shared_dir):
    result = evaluation.evaluate(
        deit_tiny, shared_dir / "data" / "imagenet-sample", limit=4, tasks=("faithfulness",), progress=False
    )
    auc = {e["method"]: e for e in result.summary["faithfulness"]}
    assert auc["intent"]["deletion_auc"] < auc["random"]["deletion_auc"]
    assert auc["intent"]["insertion_auc"] > auc["random"]["insertion_auc"]
    assert "prune" not in result.summary and "zoom" not in result.summary


def test_unreadable_image_is_skipped_not_fatal(deit_tiny, shared_dir, tmp_path):
    source = shared_dir / "data" / "imagenet-sample"
    first = eval_data.read_labels(source, 1)[0]
    shutil.copy(source / first.file, tmp_path / first.file)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    write_labels(tmp_path, "file,label_index", f"{first.file},{first.label}", "broken.jpg,1", "missing.jpg,2")
    result = evaluation.evaluate(deit_tiny, tmp_path, tasks=("zoom",), progress=False)
    assert result.summary["n"] == 1
    assert [s["file"] for s in result.summary["skipped"]] == ["broken.jpg", "missing.jpg"]


def test_label_outside_the_model_is_refused(deit_tiny, tmp_path):
    write_labels(tmp_path, "file,label_index", "x.jpg,5000")
    with pytest.raises(ZoomViTError, match="outside this model"):
        evaluation.evaluate(deit_tiny, tmp_path, progress=False)


def test_cli_eval_prints_json_and_shows_progress(deit_model_path, shared_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zoomvit",
            "eval",
            "--data",
            str(shared_dir / "data" / "imagenet-sample"),
            "--model",
            deit_model_path,
            "--limit",
            "2",
            "--tasks",
            "prune",
            "--keep",
            "0.5",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["n"] == 2 and [e["keep"] for e in summary["prune"]] == [0.5] * 6
    assert "images (imagenet-sample)" in proc.stderr and "pruning" in proc.stderr  # the progress bars
    assert (out / "prune.png").is_file() and not (out / "zoom.png").exists()


def test_cli_eval_no_timing_skips_the_latency_measurement(deit_model_path, shared_dir, tmp_path, monkeypatch):
    from zoomvit import pruning

    monkeypatch.setattr(pruning, "interleaved_ms", lambda *a, **k: pytest.fail("latency was timed"))
    out = tmp_path / "out"
    argv = ["eval", "--data", str(shared_dir / "data" / "imagenet-sample"), "--model", deit_model_path]
    argv += ["--device", "cpu", "--limit", "2", "--tasks", "prune", "--keep", "0.5", "--workers", "0"]
    assert cli.main([*argv, "--out", str(out), "--no-timing"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["settings"]["timing"] is False and len(summary["prune"]) == 6
    assert all(e["latency_ratio"] is None and 0 < e["macs_ratio"] < 1 for e in summary["prune"])
    assert "latency not measured: --no-timing" in (out / "report.md").read_text()


def earlier_run(out: Path, *extra: str) -> Path:
    """`out` as a finished run leaves it (every output, fake), with `extra` files of someone else's."""
    out.mkdir(parents=True)
    for name in (*eval_report.OUTPUTS, *extra):
        (out / name).write_text("earlier")
    return out


def test_cli_eval_refuses_an_earlier_runs_folder_before_the_model_loads(
    deit_model_path, shared_dir, tmp_path, monkeypatch, capsys
):
    """A new run would replace report.md and results.json and leave the earlier run's other plots beside them."""
    out = earlier_run(tmp_path / "out")
    monkeypatch.setattr(cli_evaluate, "load_bundle", lambda *args: pytest.fail("the model was loaded"))
    argv = [
        "eval",
        "--data",
        str(shared_dir / "data" / "imagenet-sample"),
        "--model",
        deit_model_path,
        "--out",
        str(out),
        "--tasks",
        "zoom",
    ]
    for extra in ([], ["--resume"]):  # --resume with nothing to resume would start a new run
        assert cli.main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(
            f"zoomvit: error: {out} holds an earlier run's outputs (results.json, per_image.csv, "
            "prune.png, zoom.png, faithfulness.png, sanity.png, report.md): add --overwrite"
        )
        assert err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(eval_report.OUTPUTS)


def test_cli_eval_overwrite_removes_only_what_eval_wrote(deit_model_path, shared_dir, tmp_path):
    """--overwrite: the earlier run's outputs and an interrupted run's work go, the folder's other files stay."""
    out = earlier_run(tmp_path / "out", "notes.txt")
    (out / eval_work.WORK_DIR).mkdir()
    (out / eval_work.WORK_DIR / "settings.json").write_text("{}")  # an interrupted run
    (out / eval_work.WORK_DIR / "000000.pt").write_text("earlier")
    assert (
        cli.main(
            [
                "eval",
                "--data",
                str(shared_dir / "data" / "imagenet-sample"),
                "--model",
                deit_model_path,
                "--device",
                "cpu",
                "--out",
                str(out),
                "--limit",
                "2",
                "--tasks",
                "zoom",
                "--workers",
                "0",
                "--overwrite",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "notes.txt",
        "per_image.csv",
        "report.md",
        "results.json",
        "zoom.png",
    ]
    assert (out / "notes.txt").read_text() == "earlier" and json.loads((out / "results.json").read_text())["n"] == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "/no/such/folder"], "Data folder not found"),
        (["--data", ".", "--keep", "2"], "--keep values"),
        (["--data", ".", "--tasks", "speed"], "--tasks"),
        (["--data", ".", "--batch", "0"], "--batch must be at least 1"),
        (["--data", ".", "--overwrite", "--resume"], "give one of them"),
    ],
)
def test_cli_eval_errors_are_one_line(capsys, argv, message):
    assert cli.main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoomvit: error:") and message in err and err.count("\n") == 1


def test_readme_results_are_the_committed_reports():
    """The README's Results tables are report.md files written by `zoomvit eval`, unedited, and each report is
    what its results.json gives."""
    readme = (REPO / "README.md").read_text()
    reports = sorted((REPO / "docs" / "results").glob("*/report.md"))
    assert {r.parent.name for r in reports} == {"imagenet-sample", "zoom-bench", "sanity-imagenet-sample"}
    for report in reports:
        summary = json.loads((report.parent / "results.json").read_text())
        assert report.read_text() == eval_report.markdown_report(summary)
        assert report.read_text() in readme, f"README.md does not contain {report} verbatim"


# Each study run the README quotes: its folder, and the model card's test figures the README repeats.
STUDIES = {
    "flowers-102": ("**Test top-1**: 92.35%", "19.9 min", "92.4% top-1 on the test split in 19.9 minutes"),
    "cifar-10": ("**Test top-1**: 52.10%", "41.4 min", "52.1% top-1 on the 10,000 test images in 41.4 minutes"),
}


@pytest.mark.parametrize("name", STUDIES)
def test_readme_study_is_the_committed_study_run(name):
    """The README's study section holds each study's report.md as `zoomvit eval` wrote it (its links to the example
    sheets pointed at their folder), and the training figures it quotes are the committed model card's."""
    readme = (REPO / "README.md").read_text()
    study = REPO / "docs" / "study" / name
    summary = json.loads((study / "eval" / "results.json").read_text())
    report = (study / "eval" / "report.md").read_text()
    assert report == eval_report.markdown_report(summary)
    assert eval_report.markdown_report(summary, link_base=f"docs/study/{name}/eval/") in readme
    for group in summary["examples"]["groups"].values():
        assert all((study / "eval" / sheet).is_file() for sheet in group["sheets"])
    card = (study / "train" / "model_card.md").read_text()
    accuracy, minutes, quoted = STUDIES[name]
    assert accuracy in card and minutes in card
    assert quoted in readme
