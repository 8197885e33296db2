"""The Zoom & prune tab's handlers: zoom in on where the model looks, drop tokens after a block, and the texts
that say what each did. They raise; the wiring wraps them (see `feedback`)."""

import gradio as gr
from PIL import Image

from zoomvit import config, pruning, visualization
from zoomvit import zoom as zoom_lib
from zoomvit.app.about import device_text
from zoomvit.app.feedback import clamped
from zoomvit.app.sessions import Session, SessionStore
from zoomvit.app.views import ViewRenderer
from zoomvit.checks import check_keep
from zoomvit.errors import ZoomViTError
from zoomvit.vit_analyzer import decision_change

CROP_SIDE = 384  # the zoom crop, shown beside the image
KEEP_MIN = 0.1  # the smallest keep the app offers (and the API accepts)
POLICIES = [
    ("confident: the crop when it makes the model surer", "confident"),
    ("adaptive: zoom only if the box is small", "adaptive"),
    ("always zoom", "always"),
]
MODES = [("analysis (intent ranking, look-ahead)", "analysis"), ("efficiency (no look-ahead)", "efficiency")]
# Efficiency mode: what becomes of the tokens not kept (the CLI's --fusion).
FUSIONS = [("drop", "drop"), ("fuse into one token (EViT)", "fuse"), ("merge into the nearest kept", "merge")]


def crop_for_panel(crop: Image.Image) -> Image.Image:
    """The zoom crop at CROP_SIDE pixels on its long side, blown up when smaller: a small box's crop (often ~100
    pixels) at its own size filled a third of its panel."""
    factor = CROP_SIDE / max(crop.size)
    size = (max(1, round(crop.width * factor)), max(1, round(crop.height * factor)))
    resample = Image.Resampling.BICUBIC if factor > 1 else Image.Resampling.BILINEAR
    return crop.convert("RGB").resize(size, resample)


def zoom_text(result) -> str:
    """What the zoom did and why, in the numbers it compared: the winning box, every candidate (most confident
    first), the whole image's and the crop's top classes, and what it cost."""
    x0, y0, x1, y1 = result.box
    verdict = "**Zoomed in**" if result.zoomed else "**Kept the whole image**"
    source = getattr(result, "source", None)
    text = f"{verdict}: {result.reason}. Box ({x0:.0f}, {y0:.0f}) – ({x1:.0f}, {y1:.0f}) in image pixels" + (
        f", from the {source.replace('_', ' ')} map." if source else "."
    )
    ranked = sorted(result.candidates, key=lambda c: -c.confidence)
    listed = ", ".join(f"{c.source.replace('_', ' ')} {c.confidence:.2f}" for c in ranked)
    whole, crop = result.before[0], result.crop_top
    return (
        f"{text}\n\nCandidates (each crop's top probability; the winner framed in red): {listed}. "
        f"Whole image: {whole.label} {whole.prob:.2f}; crop: {crop.label} {crop.prob:.2f}. "
        f"Zoom time {1000 * result.seconds:.0f} ms ({result.forward_units:.2f} forward units, the analysis pass "
        f"counted as 1)."
    )


def prune_text(result, num_layers: int, where: str = "this server's CPU") -> str:
    """The prune result as Markdown; `where` the times were measured (about.device_text)."""
    verdict = f"decision **{'kept' if result.decision_kept else 'changed'}**: "
    verdict += decision_change(result.before[0], result.after[0])
    runs_before = result.latency_before_runs
    ratio = f" ({result.latency_after_ms / result.latency_before_ms:.0%})" if runs_before else ""
    return (
        f"Keep **{result.keep:.2f}** of the patch tokens ({result.keep:.0%}) after block {result.after_block} "
        f"of {num_layers} ({result.mode} mode{f', {result.fusion}' if result.fusion else ''}): {verdict}.\n\n"
        f"| | before | after |\n|---|---|---|\n"
        f"| tokens | {result.tokens_before} | {result.tokens_after} |\n"
        f"| MACs | {result.macs_before / 1e9:.3f} G | {result.macs_after / 1e9:.3f} G "
        f"({result.macs_after / result.macs_before:.0%}) |\n"
        f"| time: median of {len(runs_before)} (range) | {result.latency_text('before')} | "
        f"{result.latency_text('after')}{ratio} |\n\n"
        f"Times: {result.latency_verdict()}. They are measured on {where}, shared with other users and "
        f"the app itself: a difference inside the ranges is noise, and a small model at batch 1 gains less than its "
        f"MACs suggest. MACs do not depend on the machine."
    )


class ZoomPruneHandlers:
    def __init__(self, store: SessionStore, views: ViewRenderer):
        self.store, self.views = store, views

    # ---- zoom --------------------------------------------------------------------------------------------
    def zoom(self, image, policy=config.ZOOM_POLICY, session=None):
        """Crop where the model looks and classify again: box, crop, before/after predictions, reason."""
        session = self.store.session_for(image, session)
        with self.store.model_lock:
            result = zoom_lib.zoom(session.analysis, policy=policy)
        session.zoom_result = result
        shown = lambda b: (*session.original_to_display(b[0], b[1]), *session.original_to_display(b[2], b[3]))
        boxed = visualization.draw_zoom_boxes(session.display, result, shown)
        crop = crop_for_panel(result.crop)
        label = self.views.label_value
        return (
            boxed,
            crop,
            label(session, result.probs_before),
            label(session, result.probs_after),
            zoom_text(result),
            session,
        )

    def toggle_zoom(self, enabled, image, policy, session):
        if not enabled:
            self.forget_zoom(session)  # the export shows what is on screen
            return (gr.skip(), gr.update(visible=False), None, None, None, None, "", session)
        outputs = self.zoom(image, policy, session)
        return (gr.skip(), gr.update(visible=True), *outputs)

    @staticmethod
    def forget_zoom(session):
        if isinstance(session, Session):
            session.zoom_result = None

    def zoom_off(self, enabled=None, image=None, policy=None, session=None):
        """After a zoom that failed: the checkbox is off again, as nothing is zoomed."""
        self.forget_zoom(session)
        return (False, gr.update(visible=False), *(gr.skip(),) * 6)

    # ---- prune -------------------------------------------------------------------------------------------
    def prune(
        self,
        image,
        keep=config.PRUNE_KEEP,
        after_block=None,
        mode=config.PRUNE_MODE,
        fusion=config.PRUNE_FUSION,
        session=None,
    ):
        """Drop tokens after a block: kept tokens on the image, predictions before/after, tokens, MACs, ms.

        keep: the share of patch tokens kept, from KEEP_MIN to 1; fusion (efficiency mode): what becomes of the
        tokens not kept, drop, fuse (one extra token) or merge (into their most similar kept token)."""
        keep = check_keep(keep, "Keep", low=KEEP_MIN)
        after_block = self.store.check_after_block(after_block, session)  # on the session's model
        if fusion not in config.PRUNE_FUSIONS:  # refused in analysis mode too, where it would not be read
            raise ZoomViTError(f"Unknown fusion '{fusion}': use one of {', '.join(config.PRUNE_FUSIONS)}.")
        session = self.store.session_for(image, session)
        with self.store.model_lock:
            result = pruning.prune(session.analysis, keep, after_block, mode, fusion)
        session.prune_result = result
        kept = visualization.token_mask_overlay(session.display, session.geometry, result.kept_mask)
        kept = visualization.draw_box(kept, session.geometry.view_box(), color="white", width=2)  # what it sees
        before = self.views.label_value(session, result.probs_before)
        after = self.views.label_value(session, result.probs_after)
        return kept, before, after, prune_text(result, session.num_layers, device_text(session.bundle)), session

    def prune_ui(self, image, keep, after_block, mode, fusion, session):
        """The controls: a typed keep out of range is brought into range and the slider shows the value used.
        Settings whose result is already on screen (the slider set to the value used) are not run again."""
        keep, fixed = clamped(keep, KEEP_MIN, 1.0, "Keep")
        if self.shown(image, keep, after_block, mode, fusion, session):
            return (keep if fixed else gr.skip(), *(gr.skip(),) * 5)
        outputs = self.prune(image, keep, after_block, mode, fusion, session)
        return (keep if fixed else gr.skip(), *outputs)

    def shown(self, image, keep, after_block, mode, fusion, session) -> bool:
        """Whether the prune result on screen is for this image and these settings (the fusion counts in
        efficiency mode only: analysis mode does not read it)."""
        if image is None or not isinstance(session, Session) or session.path != str(image):
            return False
        result = session.prune_result
        fusion = fusion if mode == "efficiency" else None
        return result is not None and (result.keep, result.after_block, result.mode, result.fusion) == (
            float(keep),
            self.store.check_after_block(after_block, session),
            mode,
            fusion,
        )

    def prune_if_stale(self, image, keep, after_block, mode, fusion, session):
        """Opening the tab: run prune once for the current image and settings, not again."""
        if image is None or not isinstance(session, Session):
            return (gr.skip(),) * 6
        return self.prune_ui(image, keep, after_block, mode, fusion, session)

    @staticmethod
    def fusion_control(mode):
        """The fusion choice is live in efficiency mode only (analysis mode keeps its top tokens and drops the rest)."""
        return gr.update(interactive=mode == "efficiency")
