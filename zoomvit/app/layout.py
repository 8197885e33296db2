"""The web app's page, one builder per panel, each returning the components it made (by name, in a namespace);
`ui` puts them on tabs and wires them."""

import csv
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from zoomvit import config, models
from zoomvit.app.explorer import Explorer
from zoomvit.app.faithfulness_panel import build_panel
from zoomvit.app.feedback import clamped_by_us
from zoomvit.app.model_chooser import model_controls
from zoomvit.app.serving import hand_over_the_file
from zoomvit.app.views import COLORMAPS, DIRECTIONS, VIEWS, legend_html
from zoomvit.app.zoom_prune import FUSIONS, KEEP_MIN, MODES, POLICIES

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets"  # zoomvit/assets: the wheel carries it
IMAGE_BUTTONS = ["download", "fullscreen"]  # no "share": it only works on Hugging Face Spaces


def text_in_the_api(dropdown: gr.Dropdown, description: str) -> gr.Dropdown:
    """List a dropdown as free text in the API docs (the target class: 1000 labels, or any label text)."""
    dropdown.api_info = lambda: {"type": "string", "description": description}
    return dropdown


def example_files():
    """([[path], ...], [caption, ...]) from zoomvit/assets/examples.csv, in its order (the files listed that are
    there)."""
    index = EXAMPLES_DIR / "examples.csv"
    if not index.is_file():
        return [], []
    with open(index, newline="") as f:
        rows = [row for row in csv.DictReader(f) if (EXAMPLES_DIR / row["file"]).is_file()]
    return [[str(EXAMPLES_DIR / row["file"])] for row in rows], [row["caption"] for row in rows]


def image_column() -> SimpleNamespace:
    """The Explore tab's left column: the upload, the examples, the prediction and the diagnosis."""
    examples, example_labels = example_files()
    c = SimpleNamespace()
    c.image = hand_over_the_file(
        gr.Image(
            label="Image",
            type="filepath",
            sources=["upload", "clipboard"],
            image_mode=None,
            height=300,
            elem_id="image",
            buttons=["fullscreen"],
        ),
        also=[EXAMPLES_DIR],
    )
    if examples:
        gr.Examples(
            examples,
            inputs=[c.image],
            example_labels=example_labels,
            cache_examples=False,
            label="Examples: photos (CC0 / public domain) and drawings",
            examples_per_page=12,
        )
    c.label = gr.Label(num_top_classes=config.TOP_K, label="Prediction (click one to explain it)", elem_id="prediction")
    c.diagnosis = gr.Markdown(elem_id="diagnosis", label="Intent diagnosis")
    return c


def view_controls(bundle: models.ViTBundle) -> SimpleNamespace:
    """The view controls, named as the ViewSettings fields they fill."""
    model = model_controls(bundle)  # choices for this model (a session's switch sends its model's)
    c = SimpleNamespace()
    with gr.Row():
        c.view = gr.Radio(
            VIEWS,
            value=config.DEFAULT_VIEW,
            label="View",
            scale=3,
            elem_id="view",
            info="rollout, CLS, attention: where it looks (any class); gradient-weighted, "
            "intent: what makes it pick the target class",
        )
        c.direction = gr.Radio(
            DIRECTIONS, value="attends_to", label="Clicked patch shows", scale=2, elem_id="direction"
        )
    with gr.Row():
        c.block = gr.Dropdown(**model["block"], label="Block", elem_id="block")
        c.head = gr.Dropdown(
            **model["head"], label="Head", info="one head, or mean / max / min (rollout too)", elem_id="head"
        )
        c.target = text_in_the_api(
            gr.Dropdown(
                **model["target"],
                label="Target class",
                info="what gradient-weighted and intent explain; type to search",
                filterable=True,
                allow_custom_value=True,
                elem_id="target",
            ),
            "class index or label text; empty: the predicted class",
        )
    with gr.Row():
        c.discard_ratio = clamped_by_us(
            gr.Slider(
                0.0,
                config.MAX_DISCARD_RATIO,
                value=config.ROLLOUT_DISCARD_RATIO,
                step=0.05,
                label="Discard ratio",
                info="rollout: share of the weakest attention dropped in each block",
                elem_id="discard",
            )
        )
        c.opacity = clamped_by_us(
            gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Opacity", info="of the heatmap", elem_id="opacity")
        )
        c.colormap = gr.Dropdown(COLORMAPS, value="jet", label="Colormap", elem_id="colormap")
    return c


def view_column(bundle: models.ViTBundle) -> SimpleNamespace:
    """The Explore tab's right column: the overlay, its controls, patch inspection, all heads, the export."""
    overlay = gr.Image(
        label="Where it looks (click a patch)",
        type="pil",
        format="jpeg",
        interactive=False,
        elem_id="overlay",
        buttons=IMAGE_BUTTONS,
    )
    legend = gr.HTML(legend_html("jet"), elem_id="legend")
    caption = gr.Markdown(elem_id="caption", label="Caption")
    c = view_controls(bundle)
    c.overlay, c.legend, c.caption = overlay, legend, caption
    with gr.Row():
        c.clear = gr.Button("Clear patch selection", size="sm")
    with gr.Accordion("Inspect a patch by its pixel coordinates", open=False):
        with gr.Row():
            c.x_in = gr.Number(label="x (image pixels)", value=None, precision=0, elem_id="x")
            c.y_in = gr.Number(label="y (image pixels)", value=None, precision=0, elem_id="y")
            c.inspect_btn = gr.Button("Inspect", elem_id="inspect")
    with gr.Accordion("All heads of this block: CLS attention, or the clicked patch's", open=True):
        c.heads_img = gr.Image(
            label="All heads",
            show_label=False,
            type="pil",
            format="jpeg",
            interactive=False,
            elem_id="heads",
            buttons=IMAGE_BUTTONS,
        )
    vars(c).update(vars(build_panel()))  # faith_btn, faith_plot, faith_text
    with gr.Row():
        c.export_btn = gr.Button("Export: full-size PNG + JSON", size="sm", elem_id="export")
    c.export_files = gr.File(label="Export", file_count="multiple", interactive=False, elem_id="export_files")
    return c


def zoom_panel() -> SimpleNamespace:
    """The Zoom & prune tab's zoom controls and results."""
    c = SimpleNamespace()
    with gr.Row():
        c.zoom_on = gr.Checkbox(False, label="Zoom in on where the model looks", elem_id="zoom_on")
        c.policy = gr.Radio(
            POLICIES,
            value=config.ZOOM_POLICY,
            label="Zoom policy",
            elem_id="policy",
            info="confident: the crop decides when its top probability beats the whole image's by "
            f"{config.ZOOM_MARGIN:.2f}; adaptive: only when the box is small, then 70% whole image + 30% crop",
        )
    with gr.Group(visible=False) as c.zoom_group:
        with gr.Row():
            c.zoom_box = gr.Image(
                label="Zoom box",
                type="pil",
                format="jpeg",
                interactive=False,
                height=320,
                elem_id="zoom_box",
                buttons=IMAGE_BUTTONS,
            )
            c.zoom_crop = gr.Image(
                label="Crop",
                type="pil",
                format="jpeg",
                interactive=False,
                height=320,
                elem_id="zoom_crop",
                buttons=IMAGE_BUTTONS,
            )
        c.zoom_info = gr.Markdown(label="Zoom decision", elem_id="zoom_info")
        with gr.Row():
            c.zoom_before = gr.Label(num_top_classes=3, label="Before (whole image)")
            c.zoom_after = gr.Label(num_top_classes=3, label="After zoom")
    return c


def prune_panel(ex: Explorer) -> SimpleNamespace:
    """The Zoom & prune tab's pruning controls and results, and the tab's export."""
    c = SimpleNamespace()
    gr.Markdown("### Token pruning")
    with gr.Row():
        c.keep = clamped_by_us(
            gr.Slider(
                KEEP_MIN,
                1.0,
                value=config.PRUNE_KEEP,
                step=0.05,
                label="Keep",
                info="share of patch tokens kept after the block (0.1 to 1.0); the class token always stays",
                elem_id="keep",
            )
        )
        c.after_block = gr.Dropdown(
            **model_controls(ex.store.bundle)["after_block"], label="Prune after block", elem_id="after_block"
        )
        c.mode = gr.Radio(MODES, value=config.PRUNE_MODE, label="Mode", elem_id="mode")
        c.fusion = gr.Radio(
            FUSIONS,
            value=config.PRUNE_FUSION,
            label="Fusion",
            elem_id="fusion",
            info="efficiency mode: what becomes of the tokens not kept",
            interactive=config.PRUNE_MODE == "efficiency",
        )
    with gr.Row():
        c.kept_img = gr.Image(
            label="Kept tokens (dropped ones greyed out)",
            type="pil",
            format="jpeg",
            interactive=False,
            elem_id="kept",
            buttons=IMAGE_BUTTONS,
        )
        with gr.Column():
            with gr.Row():
                c.prune_before = gr.Label(num_top_classes=3, label="Before", elem_id="prune_before")
                c.prune_after = gr.Label(num_top_classes=3, label="After pruning", elem_id="prune_after")
            c.prune_stats = gr.Markdown(elem_id="prune_stats", label="Pruning cost")
    with gr.Row():
        c.zp_export_btn = gr.Button("Export: full-size PNG + JSON", size="sm", elem_id="zp_export")
    c.zp_export_files = gr.File(label="Export", file_count="multiple", interactive=False, elem_id="zp_export_files")
    return c
