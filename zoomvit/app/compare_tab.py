"""The app's Compare tab: every map of the image side by side, the Explore tab's view over all blocks and every
head of its block, large enough to read, drawn by `compare` from the session's cached analysis (no model run;
a new target class costs one backward, once, as on the Explore tab).

The Explore tab's controls drive it (view, block, head, target, colours, direction). A click on a tile is a click
on the main view: it inspects that patch there too, and makes the tile the Explore tab's view, block or head.
Layout (`layout`), handlers (`CompareHandlers`, made by `explorer.Explorer`) and wiring (`wire`, `endpoint`);
app.py only calls them.
"""

import weakref
from dataclasses import replace
from types import SimpleNamespace

import gradio as gr

from zoomvit import compare, config
from zoomvit.app.feedback import finite_number, keeps_view
from zoomvit.app.sessions import Session, SessionStore
from zoomvit.app.views import READS, VIEWS, ViewRenderer, ViewSettings, head_name, legend_html
from zoomvit.errors import ZoomViTError

SHEETS = ("maps", "strip", "heads")  # the three clickable pictures, top to bottom
STRIPS_KEPT = 4  # block strips (view, head, target, discard ratio) a session keeps: redrawing them is free

INTRO = (
    "Every map of the **Explore** tab's image side by side, its view over all blocks, and every head of its block, "
    "all from the one analysis pass. The Explore tab's controls choose the view, block, head, target class and "
    "colours; the framed tiles are what it shows.\n\n"
    "**Click a patch in any tile** to inspect it, as a click on the main view: the block row then shows what it "
    "attends to (or what attends to it) in every block, the heads row in every head of the block, and each map "
    "outlines it. The tile clicked becomes the Explore tab's view, block or head. Click a tile's **name** to "
    "choose it without picking a patch."
)
CSS = """
:is(#cmp_maps, #cmp_strip, #cmp_heads) img { cursor: crosshair; }
"""
NO_IMAGE = "Upload an image on the **Explore** tab first: this tab compares its maps."


def layout() -> SimpleNamespace:
    """The tab's components (build it inside a gr.Tab)."""
    c = SimpleNamespace()
    gr.Markdown(INTRO, elem_id="cmp_intro")
    c.cmp_legend = gr.HTML(legend_html("jet"), elem_id="cmp_legend")
    for name, label in zip(SHEETS, ("Every map", "Block by block", "Every head of the block")):
        # Each picture's title above it (a label badge would cover its first tile).
        setattr(
            c,
            f"cmp_{name}_text",
            gr.Markdown(
                NO_IMAGE if name == "maps" else "", elem_id=f"cmp_{name}_text", label=f"{label}: what it shows"
            ),
        )
        setattr(
            c,
            f"cmp_{name}",
            gr.Image(
                label=label,
                show_label=False,
                type="pil",
                format="jpeg",
                interactive=False,
                elem_id=f"cmp_{name}",
                buttons=["download", "fullscreen"],
            ),
        )
    c.cmp_clear = gr.Button("Clear patch selection", size="sm", elem_id="cmp_clear")
    return c


def outputs(ui: SimpleNamespace) -> list:
    """What `CompareHandlers.render` fills: the three pictures, then their titles."""
    return [*(getattr(ui, f"cmp_{name}") for name in SHEETS), *(getattr(ui, f"cmp_{name}_text") for name in SHEETS)]


def sheet_titles(session: Session, s: ViewSettings, layer: int, head, target: int, patch) -> list[str]:
    """What each of the three pictures shows, in words."""
    label, prob = session.bundle.label(target), float(session.analysis.probs[target])
    name = dict((v, text) for text, v in VIEWS).get(s.view, s.view)
    last = session.num_layers
    lines = [
        f"**Every map**: gradient-weighted and intent explain *{label}* ({prob:.1%}); rollout runs through "
        f"all {last} blocks; CLS and attention are block {layer + 1}'s ({head_name(head)})."
    ]
    if patch is not None:
        row, col = patch
        what = "what attends to it" if s.direction == "attended_by" else "what it attends to"
        lines.append(
            f"**Block by block**: patch **row {row}, column {col}**, {what}, in each of the {last} "
            f"blocks ({head_name(head)})."
        )
    elif s.view in compare.ACCUMULATED:
        lines.append(
            f"**Block by block: {name}** through blocks 1 to b (the model cut after block b): where "
            f"the map takes shape. The last tile is the map itself."
        )
    else:
        lines.append(f"**Block by block: {name}**, each block's own ({head_name(head)}).")
    whose = "the clicked patch's attention" if patch is not None else "what the class token reads"
    lines.append(f"**Every head of block {layer + 1}**: {whose}.")
    return lines


class CompareHandlers:
    """Draws the Compare tab from a session's analysis; a click there inspects the patch on the Explore tab too."""

    def __init__(self, store: SessionStore, views: ViewRenderer, explore):
        self.store, self.views, self.explore = store, views, explore
        self._strips = weakref.WeakKeyDictionary()  # session -> {key: block maps}, newest last

    # ---- drawing ---------------------------------------------------------------------------------------------
    def render(self, session: Session, settings: ViewSettings, patch=None):
        """(every map, block strip, every head, and the title of each) for these settings; `patch` (row, col) or
        None."""
        s = settings
        layer, head = self.store.block_index(s.block, session), self.store.head_index(s.head, session)
        alpha = finite_number(s.opacity, "Opacity")
        if alpha is None or not 0.0 <= alpha <= 1.0:
            raise ZoomViTError(f"Opacity must be from 0 to 1, got {s.opacity!r}.")
        discard_ratio = finite_number(s.discard_ratio, "Discard ratio")
        if discard_ratio is None:
            raise ZoomViTError(f"Discard ratio is empty: give a number from 0 to {config.MAX_DISCARD_RATIO}.")
        target = self.store.resolve_target(session, s.target)
        source = self.store.for_target(session, target)  # the target's views; the others are the same for any
        picture = dict(image=session.display, geometry=session.geometry)
        colours = dict(cmap=s.colormap, alpha=alpha)
        maps = compare.map_tiles(
            source,
            [v for _, v in VIEWS],
            [label for label, _ in VIEWS],
            layer,
            head,
            discard_ratio,
            patch=patch,
            selected=s.view,
            **colours,
            **picture,
        )
        strip_maps = self._block_maps(session, source, s, head, discard_ratio, patch)
        accumulated = patch is None and s.view in compare.ACCUMULATED
        strip = compare.draw_sheet(
            session.display,
            session.geometry,
            strip_maps,
            compare.block_names(len(strip_maps), s.view, patch),
            compare.STRIP_SIDES,
            patch=patch,
            selected=len(strip_maps) - 1 if accumulated else layer,
            **colours,
        )
        heads = compare.heads_grid(
            session.analysis,
            layer,
            patch,
            s.direction,
            selected=None if isinstance(head, str) else head,
            **colours,
            **picture,
        )
        return (maps.image, strip.image, heads.image, *sheet_titles(session, s, layer, head, target, patch))

    def _block_maps(self, session, source, s: ViewSettings, head, discard_ratio, patch):
        """compare.block_maps, kept for the last few settings: the accumulated maps cost ~0.1-0.5 s a strip."""
        if patch is not None:  # one attention row per block: nothing to keep
            return compare.block_maps(source, s.view, head, discard_ratio, patch, s.direction)
        kept = self._strips.setdefault(session, {})
        key = (source.target, s.view, str(head), discard_ratio if "discard_ratio" in READS[s.view] else None)
        if key not in kept:
            kept[key] = compare.block_maps(source, s.view, head, discard_ratio)
            while len(kept) > STRIPS_KEPT:
                kept.pop(next(iter(kept)))
        return kept[key]

    # ---- events ----------------------------------------------------------------------------------------------
    def show(self, session, settings: ViewSettings):
        """The tab opened: draw it for the Explore tab's settings and its clicked patch, if any."""
        if not isinstance(session, Session):
            return None, None, None, NO_IMAGE, "", "", gr.skip()
        return (*self.render(session, settings, session.patch), legend_html(settings.colormap))

    def compare(self, image, x=None, y=None, settings: ViewSettings = ViewSettings(), session=None):
        """Every map, the view over all blocks and every head of the block, as three pictures, and what each
        shows. With x and y (the image's own pixels): the block and head pictures show that patch's attention."""
        x, y = finite_number(x, "x"), finite_number(y, "y")
        if (x is None) != (y is None):
            raise ZoomViTError("Give both x and y (image pixels), or neither.")
        session = self.store.session_for(image, session)
        patch = None
        if x is not None:
            ow, oh = session.analysis.loaded.original_size
            if not (0 <= x < ow and 0 <= y < oh):
                raise ZoomViTError(f"The point ({x:g}, {y:g}) is outside the {ow}x{oh} image.")
            patch = session.geometry.pixel_to_patch(*session.original_to_display(x, y))
            if patch is None:
                raise ZoomViTError(f"The point ({x:g}, {y:g}) is outside what the model sees (its centre crop).")
        return (*self.render(session, settings, patch), session)

    def click(self, sheet: str, session, settings: ViewSettings, evt: gr.SelectData):
        """A click on one of the sheets: the tile becomes the Explore tab's view, block or head; on a picture, its
        patch is inspected there and here. Returns the view, block, head, the Explore tab's overlay, caption,
        heads grid, x, y, and this tab's pictures and titles."""
        if not isinstance(session, Session):
            raise ZoomViTError("Upload an image first.")
        counts = {"maps": len(VIEWS), "strip": session.num_layers, "heads": session.num_heads}
        sides = {"maps": compare.MAP_SIDES, "strip": compare.STRIP_SIDES, "heads": compare.HEAD_SIDES}
        hit = compare.tile_layout(session.display.size, counts[sheet], sides[sheet]).hit(*evt.index[:2])
        if hit is None:  # between tiles
            return (gr.skip(),) * 14
        index, point = hit
        chosen = [gr.skip()] * 3
        if sheet == "maps":
            settings, chosen[0] = replace(settings, view=VIEWS[index][1]), VIEWS[index][1]
        elif sheet == "strip":
            settings, chosen[1] = replace(settings, block=index + 1), index + 1
        else:
            settings, chosen[2] = replace(settings, head=str(index + 1)), str(index + 1)
        x = y = gr.skip()
        if point is None:  # the name: choose the tile, keep the patch
            main = self.views.render(session, settings)
        else:
            xd, yd = point[0] * session.display.width, point[1] * session.display.height
            main = self.explore.inspect_at(session, xd, yd, settings)
            x, y = (round(v) for v in session.display_to_original(xd, yd))
        return (*chosen, *main, x, y, *self.render(session, settings, session.patch))

    def clear(self, session, settings: ViewSettings):
        """Forget the clicked patch, here and on the Explore tab."""
        if not isinstance(session, Session):
            return (gr.skip(),) * 9
        session.patch = None
        return (*self.views.render(session, settings), *self.render(session, settings))


# ---- wiring (app.py calls these) -----------------------------------------------------------------------------


def endpoint(ex, ui: SimpleNamespace, view_event) -> tuple:
    """The /compare API: (handler, inputs, outputs), image first, then x, y and the view controls."""
    fn, inputs = view_event(ex.compare.compare, [ui.image, ui.x_in, ui.y_in], ui, [ui.session])
    return fn, inputs, [*outputs(ui), ui.session]


def _clicks(handlers: CompareHandlers, sheet: str):
    """The click handler of one sheet (view_event reads its signature: no extra parameter)."""

    def click(session, settings: ViewSettings, evt: gr.SelectData):
        return handlers.click(sheet, session, settings, evt)

    click.__name__ = f"click_{sheet}"
    return click


def wire(ex, ui: SimpleNamespace, view_event, model_run: dict):
    """The tab's browser events. view_event: app.view_event; model_run: the model queue's options (a new target
    class runs a backward)."""
    handlers, private = ex.compare, dict(api_visibility="private")
    pictures = outputs(ui)
    show, inputs = view_event(handlers.show, [ui.session], ui)
    ui.cmp_tab.select(keeps_view(7)(show), inputs, [*pictures, ui.cmp_legend], **model_run, **private)
    explore = [ui.view, ui.block, ui.head, ui.overlay, ui.caption, ui.heads_img, ui.x_in, ui.y_in]
    for sheet in SHEETS:
        fn, inputs = view_event(_clicks(handlers, sheet), [ui.session], ui)
        getattr(ui, f"cmp_{sheet}").select(
            keeps_view(14)(fn),
            inputs,
            [*explore, *pictures],
            trigger_mode="always_last",
            show_progress="hidden",
            **model_run,
            **private,
        )
    clear, inputs = view_event(handlers.clear, [ui.session], ui)
    ui.cmp_clear.click(
        keeps_view(9)(clear), inputs, [ui.overlay, ui.caption, ui.heads_img, *pictures], **model_run, **private
    )
    # A new image: nothing of the old one stays here (the tab redraws when it is opened).
    ui.image.change(
        lambda: (None, None, None, NO_IMAGE, "", ""), None, pictures, queue=False, show_progress="hidden", **private
    )
