"""The package as a user installs it: `pip wheel .` gives `zoomvit/` alone, and the installed wheel works away from
the source tree, from a folder full of modules with the generic names a project has (config.py, models.py, ...)."""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from app_server import free_port

REPO = Path(__file__).resolve().parents[1]
LOOK_ALIKES = ("config", "models", "app", "utils", "images", "errors", "cli", "zoom", "visualization")
TIMEOUT = 300


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    (built,) = dist.glob("zoomvit-*.whl")
    return built


@pytest.fixture(scope="module")
def user(wheel, tmp_path_factory):
    """(python, folder): an environment whose only zoomvit is the wheel's (its dependencies come from the test
    environment's site-packages, added as a plain path: the source tree's editable install is not seen), and a
    project folder whose own look-alike modules fail loudly when imported."""
    root = tmp_path_factory.mktemp("user")
    env = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=TIMEOUT)
    python = env / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    project = root / "project"
    project.mkdir()
    for name in LOOK_ALIKES:
        (project / f"{name}.py").write_text(f"raise ImportError('the project\\'s own {name}.py was imported')\n")
    return python, project, site


def run(user, *args, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    python, project, _ = user
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(python), *args], cwd=project, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_wheel_holds_the_package_alone_with_its_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"zoomvit", wheel.name.split("-py")[0] + ".dist-info"}
    examples = (REPO / "zoomvit" / "assets" / "examples.csv").read_text().splitlines()[1:]
    needed = {
        "zoomvit/assets/examples.csv",
        "zoomvit/assets/README.md",
        "zoomvit/__main__.py",
        *(f"zoomvit/assets/{line.split(',')[0]}" for line in examples),
    }
    assert needed <= set(names)
    sources = {
        str(path.relative_to(REPO))
        for path in (REPO / "zoomvit").rglob("*.py")
        if (path.parent / "__init__.py").is_file()
    }
    assert sources <= set(names)  # every module of every subpackage


def test_the_library_works_outside_the_source_tree(user, shared_dir, deit_model_path):
    image = sorted((shared_dir / "data" / "imagenet-sample").glob("*.JPEG"))[0]
    code = f"""
import json, zoomvit
from zoomvit.zoom import zoom
from zoomvit.pruning import prune
from zoomvit.intent import diagnose
bundle = zoomvit.load_model({deit_model_path!r}, device="cpu")
analysis = zoomvit.analyze(bundle, {str(image)!r})
many = zoomvit.analyze_many(bundle, [{str(image)!r}] * 2)
print(json.dumps({{"file": zoomvit.__file__, "version": zoomvit.__version__, "all": zoomvit.__all__,
    "top": analysis.top(1)[0].label, "many": [a.top(1)[0].label for a in many],
    "zoom": [int(v) for v in zoom(analysis).box], "kept": int(prune(analysis, keep=0.5).tokens_after),
    "intent": diagnose(analysis).kind}}))
"""
    result = json.loads(run(user, "-c", code).stdout.splitlines()[-1])
    assert Path(result["file"]).is_relative_to(user[2])  # the wheel's copy, not the source tree's
    assert {"load_model", "analyze", "analyze_many", "__version__"} <= set(result["all"])
    assert result["many"] == [result["top"]] * 2 and result["kept"] > 0 and len(result["zoom"]) == 4


def test_every_command_runs_outside_the_source_tree(user, shared_dir, deit_model_path, tmp_path):
    version = run(user, "-m", "zoomvit", "--version").stdout.strip()
    assert re.fullmatch(r"zoomvit \d+\.\d+\.\d+", version)
    image = str(sorted((shared_dir / "data" / "imagenet-sample").glob("*.JPEG"))[0])
    model = ["--model", deit_model_path]
    explained = json.loads(
        run(user, "-m", "zoomvit", "explain", image, *model, "--json", "--out", str(tmp_path / "map.png")).stdout
    )
    assert explained["top"] and (tmp_path / "map.png").stat().st_size > 0
    assert json.loads(run(user, "-m", "zoomvit", "zoom", image, *model, "--json").stdout)["box"]
    assert json.loads(run(user, "-m", "zoomvit", "prune", image, *model, "--json").stdout)["tokens_after"] > 0
    evaluated = ["--data", str(shared_dir / "data" / "imagenet-sample"), "--limit", "2", "--tasks", "zoom"]
    run(user, "-m", "zoomvit", "eval", *evaluated, *model, "--out", str(tmp_path / "eval"))
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["n"] == 2
    data = tmp_path / "folder"
    for split in ("train", "val"):
        for name in ("0_airplane", "1_automobile"):
            (data / split / name).mkdir(parents=True)
            for file in sorted((shared_dir / "data" / "cifar-10" / "test" / name).iterdir())[:2]:
                shutil.copy(file, data / split / name / file.name)
    scratch = "--init random --arch vit-micro --image-size 32 --patch-size 4 --epochs 1 --batch-size 4 --workers 0"
    run(user, "-m", "zoomvit", "train", str(data), *scratch.split(), "--out", str(tmp_path / "run"))
    assert (tmp_path / "run" / "README.md").is_file()


def test_serve_starts_the_app_outside_the_source_tree(user, deit_model_path):
    python, project, site = user
    port = free_port()
    server = subprocess.Popen(
        [str(python), "-m", "zoomvit", "serve", "--model", deit_model_path, "--port", str(port)],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and server.poll() is None:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/config", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert server.poll() is None, server.stdout.read()
        served = re.findall(r'"url": ?"([^"]+/wall_clock\.jpg)"', page.text)
        assert served, "the app offers no wall_clock.jpg example"
        example = httpx.get(served[0], timeout=30)  # the example the app offers is the wheel's file
        assert example.content == (site / "zoomvit" / "assets" / "wall_clock.jpg").read_bytes()
    finally:
        server.terminate()
        server.wait(timeout=30)
