"""`zoomvit eval --gallery N --examples N`: the pages of what each task got wrong or changed its mind on, the example
sheets per intent group, their links in report.md, and how they live with --overwrite and --resume."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zoomvit import cli, intent, pruning
from zoomvit.cli import evaluate as cli_evaluate
from zoomvit.errors import ZoomViTError
from zoomvit.evaluation import data as eval_data
from zoomvit.evaluation import gallery as eval_gallery
from zoomvit.evaluation import pruning_pass
from zoomvit.evaluation import report as eval_report
from zoomvit.evaluation import runner as evaluation
from zoomvit.evaluation import tasks as eval_tasks
from zoomvit.evaluation import work as eval_work
from zoomvit.vit_analyzer import analyze

LIMIT = 6
PER_PAGE = 3
PER_GROUP = 2
TASKS = ("prune", "zoom", "intent")
KEEPS = (0.5,)


@pytest.fixture(scope="module")
def picture_run(deit_tiny, shared_dir, tmp_path_factory):
    """The first zoom-bench images (boxes, so all three intent kinds can occur) with a gallery and example sheets,
    written out; every example sheet's drawing inputs are recorded. One timing round: no latency is read here."""
    data = shared_dir / "data" / "zoom-bench"
    work = tmp_path_factory.mktemp("work")
    drawn = []
    real_sheet = eval_gallery.example_sheet

    def example_sheet(*args):
        drawn.append(args)
        return real_sheet(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pruning_pass, "LATENCY_ROUNDS", 1)
        patch.setattr(eval_gallery, "example_sheet", example_sheet)
        result = evaluation.evaluate(
            deit_tiny,
            data,
            LIMIT,
            KEEPS,
            tasks=TASKS,
            progress=False,
            work_dir=work,
            workers=0,
            gallery=PER_PAGE,
            examples=PER_GROUP,
        )
    out = tmp_path_factory.mktemp("out")
    written = eval_report.write_outputs(result, out)
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"data": data, "work": work, "result": result, "out": out, "written": written, "rows": rows, "drawn": drawn}


def table_rows(page: Path) -> list[list[str]]:
    """A gallery page's table rows (after the header and its rule), as cells."""
    lines = [line for line in page.read_text().splitlines() if line.startswith("| ![](")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def expected_entries(rows, column):
    """What a page must list, from per_image.csv alone: the wrong predictions, or the changed ones ordered right ->
    wrong, wrong -> right, wrong -> another wrong (each in the CSV's order)."""
    if column is None:
        return [r["file"] for r in rows if r["predicted"] != r["label"]]
    changed = [r for r in rows if r[column] != r["predicted"]]
    broken = [r["file"] for r in changed if r["predicted"] == r["label"]]
    fixed = [r["file"] for r in changed if r[column] == r["label"]]
    other = [r["file"] for r in changed if r["file"] not in broken + fixed]
    return broken + fixed + other


def test_gallery_pages_list_what_each_task_got_wrong_or_changed(picture_run, deit_tiny):
    out, rows = picture_run["out"], picture_run["rows"]
    pages = picture_run["result"].summary["gallery"]["pages"]
    columns = {
        "accuracy": None,
        "prune_analysis_intent_0.5": "prune_analysis_intent_0.5",
        "prune_efficiency_merge_0.5": "prune_efficiency_merge_0.5",
        "zoom": "zoom_predicted",
    }
    assert [Path(p["page"]).stem for p in pages] == list(columns)
    linked = set()
    for page in pages:
        column = columns[Path(page["page"]).stem]
        expected = expected_entries(rows, column)
        assert page["images"] == len(expected) and page["shown"] == min(PER_PAGE, len(expected))
        cells = table_rows(out / page["page"])
        assert [c[1] for c in cells] == expected[:PER_PAGE]
        by_file = {r["file"]: r for r in rows}
        for c in cells:
            row = by_file[c[1]]
            assert c[2] == deit_tiny.label(int(row["label"])).split(",")[0]
            assert c[3].startswith(deit_tiny.label(int(row["predicted"])).split(",")[0] + " (")
            if column:  # the second look's class, and which way it went
                after = int(row[column])
                assert c[4].startswith(deit_tiny.label(after).split(",")[0] + " (")
                assert c[5] == (
                    "right → wrong"
                    if row["predicted"] == row["label"]
                    else "wrong → right"
                    if after == int(row["label"])
                    else "wrong → another wrong"
                )
            thumb = re.fullmatch(r"!\[\]\((thumbs/\d{6}_[\w-]+\.jpg)\)", c[0])[1]
            linked.add(thumb)
            with Image.open(out / "gallery" / thumb) as image:
                assert image.format == "JPEG"
                assert image.height <= eval_gallery.THUMB_SIDE and image.width <= 2 * eval_gallery.THUMB_SIDE + 2
    # the run has a page cut short, and changed predictions of more than one kind to order
    assert any(p["images"] > PER_PAGE for p in pages)
    assert sum(bool(count) for p in pages for count in p.get("changes", {}).values()) >= 2
    # one thumbnail per image shown anywhere, and nothing else
    assert linked and {f"thumbs/{p.name}" for p in (out / "gallery" / "thumbs").iterdir()} == linked
    assert sum(p["images"] for p in pages if p["task"] == "accuracy") == sum(r["correct"] == "0" for r in rows)


def test_example_sheets_are_the_first_of_each_group_with_the_prune_pass_tokens(picture_run, deit_tiny):
    out, rows, result = picture_run["out"], picture_run["rows"], picture_run["result"]
    groups = result.summary["examples"]["groups"]
    assert list(groups) == ["good", "inverted", "diffuse"]
    drawn_files = []
    for kind, folder in eval_gallery.GROUP_FOLDERS.items():
        members = [r["file"] for r in rows if r["intent"] == kind]
        assert groups[kind]["n"] == len(members)
        sheets = sorted((out / "examples" / folder).glob("*.png")) if members else []
        assert [re.sub(r"^\d{6}_", "", p.stem) for p in sheets] == [Path(f).stem for f in members[:PER_GROUP]]
        assert [str(p.relative_to(out)) for p in sheets] == groups[kind]["sheets"]
        assert (out / "examples" / folder).is_dir() == bool(members)
        for sheet in sheets:
            with Image.open(sheet) as image:
                assert image.format == "PNG" and image.width > 4 * eval_gallery.PANEL_SIDE
        drawn_files += members[:PER_GROUP]
    assert sum(len(g["sheets"]) for g in groups.values()) >= 2
    # What each sheet draws is what the run computed: its zoom box and the tokens the pruning pass kept, which are
    # the tokens pruning this image alone keeps.
    drawn = picture_run["drawn"]
    assert len(drawn) == len(drawn_files)
    by_file = {r["file"]: r for r in rows}
    data, after_block = picture_run["data"], result.summary["settings"]["after_block"]
    boxes = {item.file: item.box for item in eval_data.read_labels(data, LIMIT)}
    for file, (_loaded, _geometry, grid_map, zoom_box, masks, object_box, caption, region) in zip(drawn_files, drawn):
        row = by_file[file]
        judged = intent.diagnose(analyze(deit_tiny, data / file, keep_graph=False), box=boxes[file])
        # the white box on the intent map is the region the diagnosis judged (none for a diffuse map)
        assert region == (None if judged.region is None else pytest.approx(judged.region, abs=0.051))
        assert caption.startswith(f"{file}: label '{deit_tiny.label(int(row['label'])).split(',')[0]}'")
        np.testing.assert_allclose(zoom_box, [float(row[f"zoom_{k}"]) for k in eval_data.BOX_COLUMNS], atol=0.051)
        assert object_box == boxes[file]
        analysis = analyze(deit_tiny, data / file)
        np.testing.assert_allclose(grid_map, analysis.intent(), atol=1e-5)
        for (mode, *_), mask in zip(eval_tasks.INTENT_CONFIGS, masks):
            alone = pruning.prune(analysis, eval_tasks.INTENT_KEEP, after_block, mode, timing_repeats=0)
            assert mask.sum() == pruning.kept_count(mask.size, eval_tasks.INTENT_KEEP)
            np.testing.assert_array_equal(mask, alone.kept_mask, err_msg=f"{file}, {mode} mode")


def test_report_links_the_pages_and_sheets_with_each_groups_figures(picture_run):
    out, result = picture_run["out"], picture_run["result"]
    report = (out / "report.md").read_text()
    assert report == eval_report.markdown_report(json.loads((out / "results.json").read_text()))
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert {link for link in links if link.startswith("gallery/")} == {
        p["page"] for p in result.summary["gallery"]["pages"]
    }
    for link in links:
        assert (out / link).exists(), link
    intent = result.summary["intent"]
    for kind, group in result.summary["examples"]["groups"].items():
        line = next(line for line in report.splitlines() if line.startswith(f"| {eval_gallery.GROUP_NAMES[kind]} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1].startswith(f"{group['n']} (")
        assert cells[2] == (f"[{len(group['sheets'])}]({group['folder']}/)" if group["sheets"] else "0")
        g = intent[kind]
        for cell, key in zip(cells[3:], ("prune_analysis", "prune_efficiency", "zoom")):
            if g["n"]:
                assert cell == f"{100 * (g[key]['top1'] - g['top1']):+.1f} / {100 * g[key]['confidence_change']:+.1f}"
            else:
                assert cell == "– / –"
    written = {p.relative_to(out).as_posix() for p in picture_run["written"]}
    assert {p["page"] for p in result.summary["gallery"]["pages"]} <= written


def test_resuming_a_finished_work_folder_draws_the_same_pictures(picture_run, deit_tiny, monkeypatch, tmp_path):
    """The options do not change pass 1's files: a resumed run may ask for the pictures, and draws them from the
    work files alone, byte for byte; its outputs replace every picture of the folder's earlier write."""
    monkeypatch.setattr(pruning_pass, "LATENCY_ROUNDS", 1)
    monkeypatch.setattr(evaluation, "_group_pass", lambda *a, **k: pytest.fail("pass 1 ran again"))
    result = evaluation.evaluate(
        deit_tiny,
        picture_run["data"],
        LIMIT,
        KEEPS,
        tasks=TASKS,
        progress=False,
        work_dir=picture_run["work"],
        resume=True,
        workers=0,
        gallery=PER_PAGE,
        examples=PER_GROUP,
    )
    first = picture_run["result"]
    assert result.files == first.files and result.rows == first.rows
    assert result.summary["gallery"] == first.summary["gallery"]
    assert result.summary["examples"] == first.summary["examples"]
    out = tmp_path / "out"
    shutil.copytree(picture_run["out"], out)
    stale = out / "examples" / "3_diffuse_intent" / "000099_stale.png"  # an earlier run's sheet
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"earlier")
    (out / "gallery" / "notes.txt").write_text("mine")
    eval_report.write_outputs(result, out)
    assert not stale.exists() and (out / "gallery" / "notes.txt").read_text() == "mine"
    on_disk = {
        p.relative_to(out).as_posix()
        for folder in ("gallery", "examples")
        for p in (out / folder).rglob("*")
        if p.is_file()
    }
    assert on_disk == set(result.files) | {"gallery/notes.txt"}


def test_a_work_folder_of_the_earlier_format_is_not_resumed(deit_tiny, shared_dir, tmp_path):
    """Its files lack the intent maps and zoom boxes the pictures are drawn from."""
    data = shared_dir / "data" / "imagenet-sample"
    items = eval_data.read_labels(data, 2)
    settings = eval_work.fingerprint(deit_tiny, data, items, 2, (0.5,), ("zoom",), 6, 8)
    work = tmp_path / "work"
    work.mkdir()
    (work / "settings.json").write_text(json.dumps({k: v for k, v in settings.items() if k != "format"}))
    with pytest.raises(ZoomViTError, match=r"started with other settings \(format\)"):
        eval_work.open_work(work, settings, resume=True)


def fake_pictures(out: Path) -> None:
    """`out` with an earlier run's gallery and sheets (and a file of someone else's in the gallery folder)."""
    for name in (
        "gallery/accuracy.md",
        "gallery/prune_analysis_intent_0.5.md",
        "gallery/thumbs/000001_a.jpg",
        "examples/1_good_alignment/000002_b.png",
        "examples/3_diffuse_intent/000004_c.png",
        "gallery/notes.txt",
    ):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("earlier")


def test_cli_refuses_a_folder_with_earlier_pictures_and_overwrite_removes_only_them(
    deit_model_path, shared_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    fake_pictures(out)
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
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"zoomvit: error: {out} holds an earlier run's outputs (gallery, examples): add --overwrite to "
        "replace them, or choose another --out.\n"
    )
    eval_report.remove_outputs(out)  # what --overwrite does first
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["gallery", "gallery/notes.txt"]
    assert eval_report.earlier_outputs(out) == []


@pytest.mark.parametrize(
    "options, message",
    [
        (["--tasks", "zoom,prune", "--examples", "2"], "--examples needs the intent task"),
        (["--gallery", "-1"], "--gallery must be a whole number of images, 0 or more, got -1."),
        (["--examples", "-3"], "--examples must be a whole number of images, 0 or more, got -3."),
    ],
)
def test_cli_picture_options_are_checked_before_the_model_loads(
    shared_dir, tmp_path, monkeypatch, capsys, options, message
):
    monkeypatch.setattr(cli_evaluate, "load_bundle", lambda *args: pytest.fail("the model was loaded"))
    argv = ["eval", "--data", str(shared_dir / "data" / "imagenet-sample"), "--out", str(tmp_path / "o"), *options]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoomvit: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_library_checks_the_picture_requests():
    eval_gallery.check_requests(("intent",), 0, 4)
    with pytest.raises(ZoomViTError, match="needs the intent task"):
        eval_gallery.check_requests(("prune", "zoom"), 5, 1)
    for bad in (1.5, True, "3"):
        with pytest.raises(ZoomViTError, match="--gallery must be a whole number"):
            eval_gallery.check_requests(("intent",), bad, 0)
