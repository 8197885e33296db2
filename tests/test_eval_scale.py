"""`zoomvit eval` at scale: a torchrun launch and an interrupted, resumed run give the single process's results;
images decoded in DataLoader workers give the rows of the per-image pass on the files themselves."""

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zoomvit import cli, config
from zoomvit.evaluation import data as eval_data
from zoomvit.evaluation import pruning_pass
from zoomvit.evaluation import report as eval_report
from zoomvit.evaluation import runner as evaluation
from zoomvit.evaluation import tasks as eval_tasks
from zoomvit.evaluation import work as eval_work
from zoomvit.images import load_image

REPO = Path(__file__).resolve().parents[1]
LIMIT = 4
BATCH = 2  # images analysed together: 2 groups, so torchrun's ranks and a resumed run each take some
RESUME_AFTER = 1  # groups done before the simulated interruption


def eval_args(shared_dir, model, out):
    return [
        "eval",
        "--data",
        str(shared_dir / "data" / "imagenet-sample"),
        "--model",
        model,
        "--device",
        "cpu",
        "--limit",
        str(LIMIT),
        "--tasks",
        "prune,zoom,faithfulness,intent",
        "--keep",
        "0.5",
        "--batch",
        str(BATCH),
        "--out",
        str(out),
    ]


SMALL_BATCH = 1  # pruning batches in the run that splits them over the ranks: 4, two per rank
SMALL_TASKS = ("prune", "intent")  # intent: its figures hold the pruned probabilities, float for float


@pytest.fixture(scope="module")
def launches(shared_dir, deit_model_path, tmp_path_factory):
    """Runs in subprocesses, all started at the first use and collected by name as (output folder, stdout): the
    CLI in one process, the CLI under a 2-process torchrun, and `evaluate` under torchrun with pruning batches of
    SMALL_BATCH images. Every process on one thread, as torchrun sets it (float results differ in the last digits
    between thread counts)."""
    root = tmp_path_factory.mktemp("scale")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    data = str(shared_dir / "data" / "imagenet-sample")
    commands = {
        "single": [sys.executable, "-m", "zoomvit", *eval_args(shared_dir, deit_model_path, root / "single")],
        "torchrun": [*torchrun, "-m", "zoomvit", *eval_args(shared_dir, deit_model_path, root / "torchrun")],
        "small batches": [
            *torchrun,
            "tests/torchrun_evaluate.py",
            deit_model_path,
            data,
            str(root / "small"),
            str(LIMIT),
            str(SMALL_BATCH),
            ",".join(SMALL_TASKS),
        ],
    }
    procs = {
        name: subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, command in commands.items()
    }
    runs = {}

    def finished(name):
        if name not in runs:
            stdout, stderr = procs[name].communicate(timeout=600)
            assert procs[name].returncode == 0, stderr
            runs[name] = root / name, stdout
        return runs[name]

    yield finished
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


TIMING = ("speed", "machine")  # and every prune entry's latency_ratio


def without_timing(summary: dict) -> dict:
    summary = {k: v for k, v in summary.items() if k not in TIMING}
    summary["prune"] = [{k: v for k, v in e.items() if k != "latency_ratio"} for e in summary["prune"]]
    return summary


def assert_same_outputs(out: Path, reference: Path):
    """results.json equal but for the timing fields; per_image.csv identical; the same plots; report.md what the
    reference's results with this run's timing figures give."""
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert without_timing(ours) == without_timing(theirs)
    assert (out / "per_image.csv").read_text() == (reference / "per_image.csv").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    timed = {**theirs, **{k: ours[k] for k in TIMING}}
    timed["prune"] = [{**e, "latency_ratio": o["latency_ratio"]} for e, o in zip(theirs["prune"], ours["prune"])]
    assert (out / "report.md").read_text() == eval_report.markdown_report(timed)
    assert not (out / eval_work.WORK_DIR).exists()  # a complete run leaves nothing to resume


def test_interrupted_run_resumes_to_the_same_results(
    launches, shared_dir, deit_model_path, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "resumed"
    argv = [*eval_args(shared_dir, deit_model_path, out), "--workers", "0"]
    real = evaluation._group_pass
    calls, interrupt = [], {"after": RESUME_AFTER}

    def group_pass(bundle, entries, *args, **kwargs):
        if len(calls) == interrupt["after"]:
            raise KeyboardInterrupt  # as a Ctrl-C or a killed job would
        calls.append([index for index, *_ in entries])
        return real(bundle, entries, *args, **kwargs)

    monkeypatch.setattr(evaluation, "_group_pass", group_pass)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    work = out / eval_work.WORK_DIR
    done = RESUME_AFTER * BATCH
    assert sorted(p.name for p in work.glob("*.pt")) == [f"{i:06d}.pt" for i in range(done)]
    capsys.readouterr()

    # The same command again, without --resume or with other settings: refused in one line, the work kept.
    assert cli.main(argv) == 2
    assert "holds an interrupted run: add --resume" in capsys.readouterr().err
    other = [*argv, "--keep", "0.7", "--resume"]  # the last --keep counts
    assert cli.main(other) == 2
    err = capsys.readouterr().err
    assert "started with other settings (keep)" in err and err.count("\n") == 1
    assert len(list(work.glob("*.pt"))) == done

    interrupt["after"] = None
    assert cli.main([*argv, "--resume"]) == 0
    # The resumed run analysed only the images not done before, in the groups of an uninterrupted run.
    assert calls == [list(range(start, start + BATCH)) for start in range(0, LIMIT, BATCH)]
    reference, _ = launches("single")
    assert_same_outputs(out, reference)


def test_torchrun_gives_the_single_process_results(launches):
    reference, single_stdout = launches("single")
    out, stdout = launches("torchrun")
    assert_same_outputs(out, reference)
    # Rank 0 alone printed the report; the other process printed nothing.
    assert stdout == (out / "report.md").read_text() + "\n"
    with open(out / "per_image.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == LIMIT


def test_worker_decoded_rows_are_the_group_pass_on_the_files(deit_tiny, shared_dir, tmp_path):
    """Images decoded in DataLoader worker processes give the rows pass 1 gives on images read here, and a bad file
    comes back from its worker as a skipped image."""
    source = shared_dir / "data" / "imagenet-sample"
    items = eval_data.read_labels(source, 2)
    for item in items:
        shutil.copy(source / item.file, tmp_path / item.file)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    lines = [f"{items[0].file},{items[0].label}", "broken.jpg,1", f"{items[1].file},{items[1].label}"]
    (tmp_path / "labels.csv").write_text("\n".join(["file,label_index", *lines]) + "\n")
    tasks = ("zoom", "intent")
    result = evaluation.evaluate(deit_tiny, tmp_path, tasks=tasks, workers=2, progress=False)
    assert [s["file"] for s in result.summary["skipped"]] == ["broken.jpg"]
    after_block, intent_keeps = config.PRUNE_AFTER_BLOCK, [eval_tasks.INTENT_KEEP]
    entries = [(index, load_image(tmp_path / item.file), None) for index, item in zip((0, 2), items)]
    direct = evaluation._group_pass(
        deit_tiny, entries, [items[0], None, items[1]], tasks, intent_keeps, after_block, True
    )
    assert result.rows == [direct[0]["row"], direct[2]["row"]]


def test_torchrun_splits_the_pruning_batches_over_the_ranks(launches, deit_tiny, shared_dir, monkeypatch):
    """With batches of SMALL_BATCH images rank 0 runs batches 0 and 2 and rank 1 batches 1 and 3; rank 0 gathers
    them into what one process running every batch gives."""
    monkeypatch.setattr(pruning_pass, "PRUNE_BATCH", SMALL_BATCH)
    expected = evaluation.evaluate(
        deit_tiny, shared_dir / "data" / "imagenet-sample", LIMIT, keeps=(0.5,), tasks=SMALL_TASKS, progress=False
    )
    expected = json.loads(json.dumps({"rows": expected.rows, "summary": expected.summary}))
    got = json.loads(launches("small batches")[1])
    assert got["rows"] == expected["rows"]
    assert without_timing(got["summary"]) == without_timing(expected["summary"])


# ---- a killed or interrupted CLI run ----------------------------------------------------------------------


STOPPED_LIMIT = 50  # images of a run that is stopped early: enough that it cannot end first, even on a fast machine


def start_cli_eval(shared_dir, model, out, *extra):
    """`zoomvit eval` in a subprocess, one image at a time (zoom only), to be stopped early."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zoomvit",
            "eval",
            "--data",
            str(shared_dir / "data" / "imagenet-sample"),
            "--model",
            model,
            "--device",
            "cpu",
            "--limit",
            str(STOPPED_LIMIT),
            "--batch",
            "1",
            "--tasks",
            "zoom",
            "--out",
            str(out),
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, proc, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.1)
    return found


def children(pid: int) -> list[int]:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        return [int(c) for task in tasks for c in (task / "children").read_text().split()]
    except FileNotFoundError:  # it has ended (or a thread has)
        return []


def running(pid: int) -> bool:
    """A zombie (dead, waiting for whoever adopted it to reap it) does not run."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_eval_takes_its_decoding_worker_with_it(shared_dir, deit_model_path, tmp_path):
    proc = start_cli_eval(shared_dir, deit_model_path, tmp_path / "out", "--workers", "1")
    worker = None
    try:
        (worker,) = wait_for(lambda: children(proc.pid), proc)
        proc.kill()  # kill -9: no chance to stop its workers itself
        proc.wait()
        deadline = time.monotonic() + 5
        while running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(worker), "the DataLoader worker outlived the killed eval"
    finally:
        proc.kill()
        proc.communicate()
        if worker is not None and running(worker):  # this test's orphan, when the check above fails
            os.kill(worker, signal.SIGKILL)


def test_ctrl_c_is_one_line_and_the_work_is_kept(shared_dir, deit_model_path, tmp_path):
    out = tmp_path / "out"
    proc = start_cli_eval(shared_dir, deit_model_path, out, "--workers", "0")
    work = out / eval_work.WORK_DIR
    wait_for(lambda: work.is_dir() and list(work.glob("*.pt")), proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    saved = len(list(work.glob("*.pt")))
    assert saved >= 1 and stderr.splitlines()[-1] == (
        f"zoomvit: interrupted; {saved} images are saved in {work}: run again with --resume"
    )


# ---- the work folder's files are checked before a resumed run trusts them ---------------------------------


@pytest.fixture(scope="module")
def finished_work(deit_tiny, shared_dir, tmp_path_factory):
    """A folder of two images and an unreadable file, evaluated (zoom only, one image per group) into a work folder
    that is kept: (data folder, work folder, the result)."""
    data = tmp_path_factory.mktemp("checked")
    source = shared_dir / "data" / "imagenet-sample"
    items = eval_data.read_labels(source, 2)
    for item in items:
        shutil.copy(source / item.file, data / item.file)
    (data / "broken.jpg").write_bytes(b"not an image")
    lines = [f"{item.file},{item.label}" for item in items] + ["broken.jpg,1"]
    (data / "labels.csv").write_text("\n".join(["file,label_index", *lines]) + "\n")
    work = data / "work"
    result = evaluation.evaluate(deit_tiny, data, tasks=("zoom",), batch=1, workers=0, work_dir=work, progress=False)
    return data, work, result


def edit_a_value(path: Path):
    """The record in a work file, torch.save's zip after whatever precedes it, with one value changed."""
    content = path.read_bytes()
    start = content.index(b"PK\x03\x04")
    record = torch.load(io.BytesIO(content[start:]), weights_only=True)
    record["row"]["predicted"] += 1
    buffer = io.BytesIO()
    torch.save(record, buffer)
    path.write_bytes(content[:start] + buffer.getvalue())


DAMAGE = {  # name: (what is done to the work folder, the file the warning names, the image analysed again)
    "truncated": (lambda w: (w / "000000.pt").write_bytes((w / "000000.pt").read_bytes()[:300]), "000000.pt", [0]),
    "garbage": (lambda w: (w / "000001.pt").write_bytes(os.urandom(2000)), "000001.pt", [1]),
    "copied over another": (lambda w: shutil.copy(w / "000000.pt", w / "000001.pt"), "000001.pt", [1]),
    "edited value": (lambda w: edit_a_value(w / "000000.pt"), "000000.pt", [0]),
    "stray skipped file": (
        lambda w: shutil.copy(w / "000002.skipped.pt", w / "000001.skipped.pt"),
        "000001.skipped.pt",
        [],
    ),
    "damaged settings": (lambda w: (w / "settings.json").write_text('{"model": '), "settings.json", []),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_bad_work_file_is_named_and_redone(finished_work, deit_tiny, tmp_path, monkeypatch, capsys, damage):
    data, finished, expected = finished_work
    work = tmp_path / "work"
    shutil.copytree(finished, work)
    spoil, name, redone = DAMAGE[damage]
    spoil(work)
    real, calls = evaluation._group_pass, []

    def group_pass(bundle, entries, *args, **kwargs):
        calls.extend(index for index, *_ in entries)
        return real(bundle, entries, *args, **kwargs)

    monkeypatch.setattr(evaluation, "_group_pass", group_pass)
    capsys.readouterr()
    result = evaluation.evaluate(
        deit_tiny, data, tasks=("zoom",), batch=1, workers=0, work_dir=work, resume=True, progress=False
    )
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("zoomvit: warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"zoomvit: warning: {work / name}: "), warnings
    assert calls == redone
    assert result.rows == expected.rows and result.summary["skipped"] == expected.summary["skipped"]
