"""The app's exports: what a tab shows, redrawn at the image's full working resolution with a legend and a
caption (PNG), and the result behind it (JSON), in a fresh folder under Gradio's temp folder (swept)."""

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from zoomvit import model_cards, visualization
from zoomvit.app.about import device_text
from zoomvit.app.serving import get_upload_folder
from zoomvit.app.sessions import Session, SessionStore
from zoomvit.app.zoom_prune import prune_text, zoom_text
from zoomvit.errors import ZoomViTError


def plain_text(markdown: str) -> str:
    """A caption without its Markdown emphasis (for the exported picture)."""
    return re.sub(r"\*{1,2}([^*]+)\*{1,2}", r"\1", markdown)


class Exports:
    def __init__(self, store: SessionStore):
        self.store = store  # the model is each session's own (session.bundle)

    def write_export(self, session: Session, tab: str, picture: Image.Image, result: dict) -> list[str]:
        """The picture as PNG and the result as JSON, in a fresh folder under Gradio's temp folder (swept)."""
        os.makedirs(get_upload_folder(), exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="zoomvit-export-", dir=get_upload_folder()))
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(session.path).stem)[:40] or "image"
        png, js = folder / f"zoomvit-{tab}-{stem}.png", folder / f"zoomvit-{tab}-{stem}.json"
        picture.save(png, optimize=False)
        js.write_text(json.dumps(result, indent=1))
        return [str(png), str(js)]

    def result_header(self, session: Session) -> dict:
        a = session.analysis
        return {
            "model": session.bundle.name,
            "image": {
                "file": Path(session.path).name,
                "width": a.loaded.original_size[0],
                "height": a.loaded.original_size[1],
            },
            "conventions": {
                "blocks": f"numbered 1..{session.num_layers}",
                "keep": "share of patch tokens, 0..1",
                "boxes": "x0, y0, x1, y1 in the image's own pixels",
            },
            "top": [p.as_dict() for p in a.top()],
            "diagnosis": session.diagnosis.as_dict(),
        }

    def export_explore(self, session):
        if not isinstance(session, Session) or session.shown is None:
            raise ZoomViTError("Nothing to export yet: upload an image first.")
        shown, analysis = session.shown, session.analysis
        image = visualization.heat_overlay(
            analysis.loaded.image, analysis.geometry, shown.grid_map, shown.colormap, shown.alpha
        )
        if shown.patch is not None:
            width = max(2, image.width // 250)
            image = visualization.patch_outline(image, analysis.geometry, *shown.patch, color="white", width=width)
        caption = f"{model_cards.display_name(session.bundle.name)}: {plain_text(shown.caption)}"
        picture = visualization.figure_with_legend(image, shown.colormap, caption)
        result = self.result_header(session)
        result.update(
            caption=plain_text(shown.caption),
            settings=shown.settings,
            grid=list(analysis.grid),
            patch=None if shown.patch is None else {"row": shown.patch[0], "column": shown.patch[1]},
            map=np.round(shown.grid_map.astype(np.float64), 4).tolist(),
        )
        return self.write_export(session, "explore", picture, result)

    def export_zoom_prune(self, session, zoom_on=True):
        """What the tab shows: the prune result, and the zoom only while the zoom checkbox is on."""
        zoom_result = session.zoom_result if isinstance(session, Session) and zoom_on else None
        if not isinstance(session, Session) or (zoom_result is None and session.prune_result is None):
            raise ZoomViTError("Nothing to export yet: zoom or prune first.")
        analysis = session.analysis
        image = analysis.loaded.image
        lines, result = [], self.result_header(session)
        if session.prune_result is not None:
            image = visualization.token_mask_overlay(image, analysis.geometry, session.prune_result.kept_mask)
            lines.append(
                plain_text(
                    prune_text(session.prune_result, session.num_layers, device_text(session.bundle)).split("\n\n")[0]
                )
            )
            lines.append(f"Grey: the patch tokens dropped after block {session.prune_result.after_block}.")
            result["prune"] = session.prune_result.as_dict()
        if zoom_result is not None:
            box = [c * analysis.geometry.scale for c in zoom_result.box]
            image = visualization.draw_box(image, box, color=(255, 40, 40), width=max(3, image.width // 200))
            lines.append("Red: the zoom box. " + plain_text(zoom_text(zoom_result)))
            result["zoom"] = zoom_result.as_dict()
        caption = f"{model_cards.display_name(session.bundle.name)}: " + "\n".join(lines)
        return self.write_export(session, "zoom-prune", visualization.figure_with_legend(image, None, caption), result)
