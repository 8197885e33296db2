"""What practitioners expect in the app (#17): the faithfulness of the map on screen (the eval's protocol, batched,
kept per map and target), the most faithful map as the first view, high-norm artifact tokens flagged, and the
pruning fusion (drop / fuse / merge) in the Zoom & prune tab and the /prune API.

On the real DeiT-Tiny through the app's handlers (no server) where the numbers matter, on a tiny random ViT with a
forced outlier token for the artifact flag, and over gradio_client for the /prune API.
"""

import json
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from app_server import running_app
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from zoomvit import artifacts, config, faithfulness
from zoomvit.app import faithfulness_panel
from zoomvit.app import ui as app
from zoomvit.app.explorer import Explorer
from zoomvit.app.views import ViewSettings
from zoomvit.errors import ZoomViTError

REPO = Path(__file__).resolve().parents[1]
CLOCK = str(REPO / "zoomvit" / "assets" / "wall_clock.jpg")

pytestmark = [  # Gradio's queue trips over pandas 3 deprecations: not ours
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture(scope="module")
def explorer(deit_tiny):
    return Explorer(deit_tiny)


@pytest.fixture
def clock(explorer):
    """A fresh session on the wall clock, drawn in the first view (the handlers' defaults)."""
    return explorer.explore.explain(CLOCK)[-1]


@pytest.fixture
def forwards(monkeypatch):
    """The batch size of every forward the perturbation curves run."""
    sizes = []
    real = faithfulness.predict_pixels

    def counted(bundle, pixels):
        sizes.append(len(pixels))
        return real(bundle, pixels)

    monkeypatch.setattr(faithfulness, "predict_pixels", counted)
    return sizes


# ---- the default view -----------------------------------------------------------------------------------------


def test_the_first_view_is_the_map_the_eval_measures_most_faithful(explorer, clock):
    """The eval's own figures (docs/results, the README's tables) rank the maps by deletion AUC: the lowest on both
    sets is the app's first view, in the API's defaults and on screen."""
    for data in ("imagenet-sample", "zoom-bench"):
        summary = json.loads((REPO / "docs" / "results" / data / "results.json").read_text())
        maps = [e for e in summary["faithfulness"] if e["method"] != "random"]
        assert min(maps, key=lambda e: e["deletion_auc"])["method"] == config.DEFAULT_VIEW == "grad_rollout"
    assert ViewSettings().view == config.DEFAULT_VIEW
    assert clock.shown.settings["view"] == "grad_rollout"
    np.testing.assert_array_equal(clock.shown.grid_map, clock.analysis.grad_rollout())


# ---- the faithfulness panel -----------------------------------------------------------------------------------


def test_the_panel_measures_the_map_on_screen_with_the_eval_protocol_in_three_forwards(explorer, clock, forwards):
    panel = explorer.faithfulness
    assert panel.refresh(clock) == faithfulness_panel.HIDDEN  # nothing measured yet: no model run, no empty boxes
    assert forwards == []
    plot, text = panel.compute(clock)
    assert plot["visible"] and text["visible"]
    plot, text = plot["value"], text["value"]
    # All 38 perturbed images (this map's and the random map's) in three batched forwards.
    assert sorted(forwards, reverse=True) == [16, 16, 6] and faithfulness_panel.PERTURBED == 38
    analysis = clock.analysis
    deletion, insertion = faithfulness.perturbation_curves(analysis, analysis.grad_rollout())
    random_deletion, random_insertion = faithfulness.perturbation_curves(analysis, None, seed=0)
    result = panel.cached(clock)
    np.testing.assert_allclose(result.deletion, deletion, atol=1e-6)
    np.testing.assert_allclose(result.insertion, insertion, atol=1e-6)
    np.testing.assert_allclose(result.random_deletion, random_deletion, atol=1e-6)  # seeded: reproducible
    np.testing.assert_allclose(result.random_insertion, random_insertion, atol=1e-6)
    assert len(deletion) == faithfulness.STEPS + 1
    assert result.deletion[0] == pytest.approx(float(analysis.probs[analysis.predicted]))
    # The gradient-weighted map explains the clock: removing its top pixels kills the class, restoring them brings
    # it back (measured 0.117 and 0.677), far better than a random map.
    assert result.deletion_auc == pytest.approx(faithfulness.auc(deletion)) and result.deletion_auc < 0.25
    assert result.insertion_auc > 0.5
    assert result.random_deletion_auc > result.deletion_auc and result.random_insertion_auc < result.insertion_auc
    # AUCs x 100, as eval's report.md and the README show them, each beside the random map's.
    assert (
        f"deletion AUC **{100 * result.deletion_auc:.1f}** vs random {100 * result.random_deletion_auc:.1f} "
        f"(lower is better), insertion AUC **{100 * result.insertion_auc:.1f}** vs random "
        f"{100 * result.random_insertion_auc:.1f} (higher is better)"
    ) in text
    assert "*wall clock*" in text
    assert plot.size == (560, 280) and np.asarray(plot).std() > 10  # a drawn plot, not a blank


def curves_result(label: str, top: float) -> faithfulness_panel.MapFaithfulness:
    falling, rising = np.linspace(top, 0, 11), np.linspace(0, top, 11)
    return faithfulness_panel.MapFaithfulness("Rollout", 1, label, top, falling, rising, rising, falling, 0.1)


@pytest.mark.parametrize(
    "label, top",
    [
        ("wall clock", 0.77),
        ("parachute, chute", 0.003),  # small probabilities: long tick labels
        ("cash machine, cash dispenser, automated teller machine, automatic teller machine", 0.05),
        ("a class name of a fine-tuned model that runs long without a comma", 0.0004),
    ],
)
def test_the_plot_shows_its_y_axis_label_whole(label, top):
    figure = faithfulness_panel.curves_figure(curves_result(label, top))
    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # as the panel draws it: the label where the drawing put it
    renderer = canvas.get_renderer()
    axis = figure.axes[0].yaxis
    page = figure.bbox
    for part in (axis.label.get_window_extent(renderer), axis.get_tightbbox(renderer)):
        assert page.x0 <= part.x0 and part.x1 <= page.x1 and page.y0 <= part.y0 and part.y1 <= page.y1, label
    assert " ".join(axis.label.get_text().split()) == f"p({label.split(',')[0]}) in %"


def test_results_are_kept_per_map_and_target(explorer, clock, forwards, deit_tiny):
    panel, handlers = explorer.faithfulness, explorer.explore
    first = panel.measure(clock)
    count = len(forwards)
    # Opacity and colormap leave the map as it is: the same result, and the panel is not even redrawn.
    handlers.rerender(clock, ViewSettings(opacity=0.9, colormap="viridis"))
    assert panel.cached(clock) is first
    panel.compute(clock)
    assert panel.refresh(clock) == (gr.skip(), gr.skip()) and len(forwards) == count  # already on screen
    handlers.rerender(clock, ViewSettings(opacity=0.3))
    assert panel.refresh(clock) == (gr.skip(), gr.skip())
    # Another map: not measured yet (the hint); measured, it differs.
    handlers.change_view(clock, ViewSettings(view="rollout"))
    assert panel.refresh(clock) == faithfulness_panel.HIDDEN
    rollout = panel.measure(clock)
    assert rollout.view == "Rollout" and rollout.deletion_auc != first.deletion_auc
    # Another target: its own curves, of that class's probability.
    goldfish = deit_tiny.find_label("goldfish")
    handlers.rerender(clock, ViewSettings(target=str(goldfish)))
    other = panel.measure(clock)
    assert other.target == goldfish and other.label == deit_tiny.label(goldfish)
    assert other.deletion[0] == pytest.approx(float(clock.analysis.probs[goldfish]))
    count = len(forwards)
    # Back to the first view and target: the kept result, no model run.
    handlers.rerender(clock, ViewSettings())
    assert panel.measure(clock) is first and len(forwards) == count
    assert "Gradient-weighted" in panel.refresh(clock)[1]["value"]


def test_a_view_changed_while_measuring_is_not_painted_over(explorer, clock, monkeypatch):
    """The button measured the map it was pressed for; if the view changed meanwhile, the panel shows the new view's
    state (here: not measured) and the old result is kept for when that view comes back."""
    panel, handlers = explorer.faithfulness, explorer.explore
    real = faithfulness.perturbation_curves_many

    def slow(*args, **kwargs):
        handlers.change_view(clock, ViewSettings(view="attention"))  # the user moved on during the run
        return real(*args, **kwargs)

    monkeypatch.setattr(faithfulness, "perturbation_curves_many", slow)
    assert panel.compute(clock) == faithfulness_panel.HIDDEN
    monkeypatch.setattr(faithfulness, "perturbation_curves_many", real)
    handlers.change_view(clock, ViewSettings())
    assert panel.refresh(clock)[1]["value"].startswith("**Gradient-weighted** for *wall clock*")


def test_the_panel_without_an_image_says_so(explorer):
    with pytest.raises(ZoomViTError, match="Upload an image first"):
        explorer.faithfulness.compute(None)
    assert explorer.faithfulness.refresh(None) == faithfulness_panel.HIDDEN


# ---- high-norm artifact tokens --------------------------------------------------------------------------------


def test_token_norms_on_the_real_model(clock):
    analysis = clock.analysis
    expected = np.linalg.norm(analysis.hidden_states[-1, analysis.num_special :], axis=-1).reshape(analysis.grid)
    np.testing.assert_allclose(analysis.token_norms(), expected, rtol=1e-6)
    ratios = expected / np.median(expected)
    # DeiT-Tiny has no artifact tokens here (largest ratio about 1.9): nothing flagged, nothing said.
    assert ratios.max() < config.ARTIFACT_NORM_RATIO and artifacts.artifact_patches(analysis) == []
    assert "High-norm" not in clock.shown.caption
    # A low threshold flags exactly the patches above it, highest first.
    flagged = artifacts.artifact_patches(analysis, ratio=1.5)
    assert [(r, c) for r, c, _ in flagged] == sorted(zip(*np.nonzero(ratios > 1.5)), key=lambda p: -ratios[p])
    assert flagged and flagged[0][2] == pytest.approx(ratios.max(), rel=1e-5)


OUTLIER = (2, 3)  # row, column in the tiny ViT's 4x6 grid


@pytest.fixture
def outlier(tiny_vit):
    """Makes the tiny random ViT's last block add a large vector to one patch token (a forced artifact) until the
    test ends."""
    adapter = tiny_vit.adapter
    token = tiny_vit.num_special + OUTLIER[0] * 6 + OUTLIER[1]

    def hook(module, inputs, output):
        output = output.clone()
        output[:, token] += 20.0
        return output

    handles = []
    yield lambda: handles.append(adapter.parts(adapter.layers[-1]).mlp[-1].register_forward_hook(hook))
    for handle in handles:
        handle.remove()


def test_a_forced_outlier_token_is_flagged_in_the_view(tiny_vit, outlier, tmp_path):
    image = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(image)
    plain = Explorer(tiny_vit).explore.explain(str(image), ViewSettings(view="rollout"))
    assert artifacts.artifact_patches(plain[-1].analysis) == [] and "High-norm" not in plain[3]
    outlier()
    explorer = Explorer(tiny_vit)
    overlay, _, _, caption, _, session = explorer.explore.explain(str(image), ViewSettings(view="rollout"))
    flagged = artifacts.artifact_patches(session.analysis)
    assert [(r, c) for r, c, _ in flagged] == [OUTLIER] and flagged[0][2] > config.ARTIFACT_NORM_RATIO
    assert "**High-norm tokens** (magenta squares): 1 patch leaves the last block" in caption
    assert f"row {OUTLIER[0]}, column {OUTLIER[1]} ({flagged[0][2]:.1f}×)" in caption
    x0, y0, x1, y1 = (int(round(v)) for v in session.geometry.patch_box(*OUTLIER))
    pixels, before = np.asarray(overlay), np.asarray(plain[0])
    assert tuple(pixels[(y0 + y1) // 2, x0]) == artifacts.COLOR  # the patch's outline
    assert tuple(before[(y0 + y1) // 2, x0]) != artifacts.COLOR
    assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) != artifacts.COLOR  # ... not its inside
    # In every view, the clicked patch's too.
    _, caption, _ = explorer.explore.inspect_at(session, 5.0, 5.0, ViewSettings())
    assert "High-norm tokens" in caption and caption.startswith("Patch **row 0, column 0**")


def test_the_artifact_note_names_the_patches_and_counts_the_rest():
    assert artifacts.note([]) == ""
    many = [(i, i + 1, 9.0 - i) for i in range(8)]
    text = artifacts.note(many)
    assert "8 patches" in text and "row 0, column 1 (9.0×)" in text and "and 2 more" in text
    assert "row 6, column 7" not in text


# ---- fusion in the Zoom & prune tab ---------------------------------------------------------------------------


def test_prune_takes_a_fusion_in_efficiency_mode_and_exports_it(explorer, clock):
    handlers = explorer.zoom_prune
    fused = handlers.prune(CLOCK, 0.5, 6, "efficiency", "fuse", clock)
    result = clock.prune_result
    assert result.fusion == "fuse" and (result.tokens_before, result.tokens_after) == (197, 100)  # + one fused token
    assert "(efficiency mode, fuse)" in fused[3]
    png, js = explorer.exports.export_zoom_prune(clock)
    assert json.loads(Path(js).read_text())["prune"]["fusion"] == "fuse"
    merged = handlers.prune(CLOCK, 0.5, 6, "efficiency", session=clock)  # the default: merge, as in the CLI
    assert clock.prune_result.fusion == config.PRUNE_FUSION == "merge" and clock.prune_result.tokens_after == 99
    assert "(efficiency mode, merge)" in merged[3]
    # Only a new fusion in efficiency mode runs again; in analysis mode the fusion is not read.
    assert handlers.shown(CLOCK, 0.5, 6, "efficiency", "merge", clock)
    assert not handlers.shown(CLOCK, 0.5, 6, "efficiency", "drop", clock)
    analysis_mode = handlers.prune(CLOCK, 0.5, 6, "analysis", "drop", clock)
    assert clock.prune_result.fusion is None and "(analysis mode)" in analysis_mode[3]
    assert json.loads(Path(explorer.exports.export_zoom_prune(clock)[1]).read_text())["prune"]["fusion"] is None
    assert handlers.shown(CLOCK, 0.5, 6, "analysis", "fuse", clock)
    assert handlers.prune_ui(CLOCK, 0.5, 6, "analysis", "merge", clock) == (gr.skip(),) * 6
    with pytest.raises(ZoomViTError, match="Unknown fusion 'blend': use one of drop, fuse, merge"):
        handlers.prune(CLOCK, 0.5, 6, "analysis", "blend", clock)
    assert handlers.fusion_control("efficiency")["interactive"] is True
    assert handlers.fusion_control("analysis")["interactive"] is False


@pytest.fixture(scope="module")
def server(deit_tiny):
    with running_app(deit_tiny) as (demo, url):
        yield demo, Client(url, verbose=False)


@pytest.fixture(scope="module")
def client(server):
    return server[1]


def test_the_faithfulness_button_runs_in_the_model_queue_and_a_view_change_does_not(server):
    demo, client = server
    events = {fn.name: fn for fn in demo.fns.values() if fn.name in ("measure_faithfulness", "refresh")}
    button = events["measure_faithfulness"]  # Explorer.measure_faithfulness: analyses first after a model switch
    assert button.concurrency_id == app.MODEL_QUEUE and button.concurrency_limit == 1
    assert events["refresh"].concurrency_id != app.MODEL_QUEUE
    assert not any(
        "faith" in name or name in ("/measure_faithfulness", "/refresh")
        for name in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    )


def test_the_prune_api_takes_a_fusion_with_a_default(client):
    _, _, _, stats = client.predict(handle_file(CLOCK), 0.5, 6, "efficiency", api_name="/prune")
    assert "(efficiency mode, merge)" in stats and "| tokens | 197 | 99 |" in stats
    _, _, _, stats = client.predict(handle_file(CLOCK), 0.5, 6, "efficiency", "fuse", api_name="/prune")
    assert "(efficiency mode, fuse)" in stats and "| tokens | 197 | 100 |" in stats
    _, _, _, stats = client.predict(handle_file(CLOCK), 0.3, 6, "efficiency", "drop", api_name="/prune")
    assert "(efficiency mode, drop)" in stats and "| tokens | 197 | 60 |" in stats
    with pytest.raises(AppError, match="Unknown fusion 'blend': use one of drop, fuse, merge"):  # names it
        client.predict(handle_file(CLOCK), 0.5, 6, "efficiency", "blend", api_name="/prune")
