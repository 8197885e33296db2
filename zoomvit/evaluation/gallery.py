"""`zoomvit eval`'s pictures of single images, drawn from what the run has computed (no model call):

- the gallery (`--gallery N`): one Markdown page per task, OUT/gallery/<task>.md, listing the first N images that
  task got wrong (top-1) or changed its mind on (pruning in each mode at each keep, zoom: the prediction flipped),
  each with a thumbnail (the image beside the intent map of its prediction, OUT/gallery/thumbs), its label, the
  prediction before and after and their confidence. Bounded by N, so a long run's gallery stays small.
- example sheets (`--examples N`): for each intent group (see `intent`) the first N of its images, one PNG each in
  OUT/examples/1_good_alignment, 2_inverted_intent, 3_diffuse_intent: the image with the zoom box, the intent map,
  the zoom crop and the tokens kept by pruning in both modes at eval_tasks.INTENT_KEEP, drawn by the export
  functions of `visualization` (colour bar, DejaVu caption with every prediction before and after).

Both are listed in results.json (`gallery`, `examples`) and linked from report.md (see `eval_report`). The files
are eval's own outputs: `earlier_pictures` and `remove_pictures` find and remove them (and nothing else).
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

from zoomvit import visualization
from zoomvit.errors import ZoomViTError
from zoomvit.evaluation.data import BOX_COLUMNS
from zoomvit.evaluation.tasks import INTENT_CONFIGS
from zoomvit.geometry import geometry_for
from zoomvit.images import load_image
from zoomvit.intent import KINDS

GALLERY = "gallery"
EXAMPLES = "examples"
THUMBS = f"{GALLERY}/thumbs"
GROUP_FOLDERS = dict(zip(KINDS, ("1_good_alignment", "2_inverted_intent", "3_diffuse_intent")))
GROUP_NAMES = dict(zip(KINDS, ("good alignment", "inverted intent", "diffuse intent")))
# How a second look changed a prediction (results.json's keys: how it is written); a page lists the predictions that
# flipped in this order: what a second look broke comes first.
CHANGES = {
    "right_to_wrong": "right → wrong",
    "wrong_to_right": "wrong → right",
    "wrong_to_wrong": "wrong → another wrong",
}
THUMB_SIDE = 112  # each half of a thumbnail: small enough that a page of many loads at once
PANEL_SIDE = 224  # each panel of an example sheet
PAGE_NAME = re.compile(r"(accuracy|zoom|prune_[a-z_]+_[0-9.]+)\.md")
_PICTURE = r"\d{6}_[A-Za-z0-9_-]*\."  # see `_stem`
OWN_FILES = {
    GALLERY: PAGE_NAME,
    THUMBS: re.compile(_PICTURE + "jpg"),
    **{f"{EXAMPLES}/{folder}": re.compile(_PICTURE + "png") for folder in GROUP_FOLDERS.values()},
}


def check_requests(tasks, gallery, examples) -> None:
    """--gallery and --examples: whole numbers, 0 or more; examples need the intent task (its groups)."""
    for name, value in (("--gallery", gallery), ("--examples", examples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ZoomViTError(f"{name} must be a whole number of images, 0 or more, got {value!r}.")
    if examples and "intent" not in tasks:
        raise ZoomViTError(
            "--examples needs the intent task (its groups are the intent diagnosis's): add intent to --tasks."
        )


# ---- the files ---------------------------------------------------------------------------------------------


def _own_files(out: Path) -> list[Path]:
    return [
        path
        for folder, name in OWN_FILES.items()
        if (out / folder).is_dir()
        for path in sorted((out / folder).iterdir())
        if name.fullmatch(path.name) and path.is_file()
    ]


def earlier_pictures(out) -> list[Path]:
    """OUT/gallery and OUT/examples where they hold an earlier run's pictures or pages."""
    out = Path(out)
    tops = {path.relative_to(out).parts[0] for path in _own_files(out)}
    return [out / top for top in (GALLERY, EXAMPLES) if top in tops]


def remove_pictures(out) -> None:
    """An earlier run's gallery and example sheets removed, and their folders where nothing else is left in them
    (a file of anyone else's stays)."""
    out = Path(out)
    for path in _own_files(out):
        path.unlink()
    for folder in sorted(OWN_FILES, key=len, reverse=True) + [EXAMPLES]:  # the deepest first
        with contextlib.suppress(OSError):
            (out / folder).rmdir()


def write_pictures(files: dict, out) -> list[Path]:
    """`files` ({path under OUT: bytes}) written; returns the gallery pages and the example folders written."""
    out = Path(out)
    shown = []
    for name, content in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        shown.append(path if path.suffix == ".md" else path.parent if path.suffix == ".png" else None)
    return [path for path in dict.fromkeys(shown) if path is not None]


# ---- drawing -----------------------------------------------------------------------------------------------


def _side_by_side(panels, gap: int) -> Image.Image:
    """Pictures in a row on white, centred on the tallest."""
    height = max(p.height for p in panels)
    row = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), height), (255, 255, 255))
    x = 0
    for panel in panels:
        row.paste(panel.convert("RGB"), (x, (height - panel.height) // 2))
        x += panel.width + gap
    return row


def thumbnail(loaded, geometry, grid_map: np.ndarray) -> Image.Image:
    """The image and the map over it, side by side, THUMB_SIDE pixels on their longest side (a tiny image is
    blown up to it)."""
    small, view = visualization.resized_view(loaded.image, geometry, THUMB_SIDE, THUMB_SIDE)
    return _side_by_side([small, visualization.heat_overlay(small, view, grid_map)], 2)


def example_sheet(
    loaded, geometry, grid_map: np.ndarray, zoom_box, masks, object_box, caption: str, region=None
) -> Image.Image:
    """One image's sheet: the image (red: the zoom box; green: the object box, when known), the intent map (white:
    `region`, the region the intent diagnosis judged, when it judged one), the zoom crop, and the tokens each
    pruning kept (`masks`: grid-shaped, True = kept), with a colour bar and `caption`. Boxes are in the file's own
    pixels."""
    base, view = visualization.resized_view(loaded.image, geometry, PANEL_SIDE, PANEL_SIDE)
    line = max(2, base.width // 90)
    framed = base
    for box, colour in ((object_box, (40, 200, 40)), (zoom_box, (255, 40, 40))):
        if box is not None:
            framed = visualization.draw_box(framed, [c * view.scale for c in box], color=colour, width=line)
    crop = loaded.image.crop(tuple(int(round(c * geometry.scale)) for c in zoom_box))
    size = (max(1, round(crop.width * base.height / max(1, crop.height))), base.height)
    resample = Image.Resampling.NEAREST if size[1] > crop.height else Image.Resampling.BILINEAR
    heat = visualization.heat_overlay(base, view, grid_map)
    if region is not None:
        heat = visualization.draw_box(heat, [c * view.scale for c in region], color="white", width=line)
    panels = [framed, heat, crop.resize(size, resample)]
    panels += [visualization.token_mask_overlay(base, view, mask) for mask in masks]
    return visualization.figure_with_legend(_side_by_side(panels, max(4, base.width // 40)), "jet", caption)


def _encoded(picture: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, kind, **({"quality": 85} if kind == "JPEG" else {}))
    return buffer.getvalue()


def _stem(index: int, file: str) -> str:
    return f"{index:06d}_{re.sub(r'[^A-Za-z0-9_-]+', '_', Path(file).stem)[:40]}"


# ---- what the gallery lists --------------------------------------------------------------------------------


def _change(label: int, before: int, after: int) -> str:
    return "right_to_wrong" if before == label else "wrong_to_right" if after == label else "wrong_to_wrong"


def _lists(rows, records, kept, pruned, tasks, keeps) -> list[dict]:
    """Every page: name, title, and `afters` ([(class, confidence)] per image after the task's second look; None
    for the top-1 page, which lists the wrong predictions)."""
    pages = [{"name": "accuracy", "task": "accuracy", "title": "top-1: images predicted wrong", "afters": None}]
    if "prune" in tasks:
        for mode, criterion, _ in INTENT_CONFIGS:  # each mode's own ranking
            for keep in keeps:
                run = pruned[mode, criterion, keep]
                pages.append(
                    {
                        "name": f"prune_{mode}_{criterion}_{keep:g}",
                        "task": "prune",
                        "mode": mode,
                        "criterion": criterion,
                        "keep": keep,
                        "title": f"pruning, {mode} mode ({criterion}), keep {keep:g}: predictions changed",
                        "afters": list(zip(run.predicted.tolist(), run.confidence.tolist())),
                    }
                )
    if "zoom" in tasks:
        looks = [records[i]["look"] for i in kept]
        pages.append(
            {
                "name": "zoom",
                "task": "zoom",
                "title": "adaptive zoom: predictions changed",
                "afters": [(look["predicted"], look["confidence"]) for look in looks],
            }
        )
    for page in pages:
        if page["afters"] is None:
            page["entries"] = [j for j, row in enumerate(rows) if not row["correct"]]
        else:
            changed = [j for j, row in enumerate(rows) if page["afters"][j][0] != row["predicted"]]
            page["changes"] = {
                c: [j for j in changed if _change(rows[j]["label"], rows[j]["predicted"], page["afters"][j][0]) == c]
                for c in CHANGES
            }
            page["entries"] = [j for c in CHANGES for j in page["changes"][c]]
    return pages


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def change_counts(changes: dict) -> str:
    """'4 wrong → right, 1 wrong → another wrong' from {change: count}: the kinds of change that happened."""
    return ", ".join(f"{count} {CHANGES[change]}" for change, count in changes.items() if count)


def _page_markdown(page, rows, thumbs, per_page, data_name, name) -> str:
    entries, n = page["entries"], len(rows)
    if "changes" in page:
        counts = change_counts({c: len(js) for c, js in page["changes"].items()})
        what = f"{len(entries)} of {n} predictions changed" + (f" ({counts})" if counts else "")
    else:
        what = f"{len(entries)} of {n} images predicted wrong"
    shown = f"; the first {min(per_page, len(entries))} are shown" if entries else ""
    order = f" ({', then '.join(CHANGES.values())})" if shown and "changes" in page else ""
    lines = [
        f"# {_cell(data_name)}: {page['title']}",
        "",
        f"{what}{shown}{order}. Thumbnails: the image and the intent map of its prediction (red: more "
        "important). Back to the [report](../report.md).",
        "",
    ]
    if entries and page["afters"] is None:
        lines += ["| | image | label | prediction (confidence) | probability of the label |", "|---|---|---|---|---|"]
        lines += [
            f"| ![]({thumbs[j]}) | {_cell(rows[j]['file'])} | {_cell(name(rows[j]['label']))} | "
            f"{_cell(name(rows[j]['predicted']))} ({rows[j]['confidence']:.1%}) | "
            f"{rows[j]['label_prob']:.1%} |"
            for j in entries[:per_page]
        ]
    elif entries:
        lines += [
            "| | image | label | before (confidence) | after (confidence) | change |",
            "|---|---|---|---|---|---|",
        ]
        for j in entries[:per_page]:
            after, confidence = page["afters"][j]
            lines.append(
                f"| ![]({thumbs[j]}) | {_cell(rows[j]['file'])} | {_cell(name(rows[j]['label']))} | "
                f"{_cell(name(rows[j]['predicted']))} ({rows[j]['confidence']:.1%}) | "
                f"{_cell(name(after))} ({confidence:.1%}) | "
                f"{CHANGES[_change(rows[j]['label'], rows[j]['predicted'], after)]} |"
            )
    return "\n".join(lines) + "\n"


# ---- one run's pictures ------------------------------------------------------------------------------------


def collect(bundle, data, items, kept, records, summary, rows, pruned, gallery: int, examples: int):
    """(results.json's `gallery` and `examples` entries, {path under OUT: file content}) for a finished run.
    `kept`: the evaluated images' indices into `items`, in the order of `rows`; `records`: pass 1's, by index."""
    settings = summary["settings"]
    name = lambda index: bundle.label(index).split(",")[0]

    def image(j):  # decoded again rather than kept: a few hundred pictures of full-size photos would fill memory
        loaded = load_image(Path(data) / items[kept[j]].file)
        return loaded, geometry_for(bundle, loaded.image.size, loaded.scale)

    def grid_map(j):
        return records[kept[j]]["intent_map"].numpy()

    parts, files = {}, {}
    if gallery:
        pages = _lists(rows, records, kept, pruned, settings["tasks"], settings["keep"])
        thumbs = {}  # position: its thumbnail, relative to the pages
        for j in sorted({j for page in pages for j in page["entries"][:gallery]}):
            thumbs[j] = f"thumbs/{_stem(kept[j], items[kept[j]].file)}.jpg"
            files[f"{GALLERY}/{thumbs[j]}"] = _encoded(thumbnail(*image(j), grid_map(j)), "JPEG")
        data_name = Path(summary["data"]).name
        for page in pages:
            files[f"{GALLERY}/{page['name']}.md"] = _page_markdown(
                page, rows, thumbs, gallery, data_name, name
            ).encode()
        parts["gallery"] = {
            "per_page": gallery,
            "pages": [
                {
                    **{k: v for k, v in page.items() if k not in ("afters", "entries", "changes", "name")},
                    "page": f"{GALLERY}/{page['name']}.md",
                    "images": len(page["entries"]),
                    "shown": min(gallery, len(page["entries"])),
                    **({"changes": {c: len(js) for c, js in page["changes"].items()}} if "changes" in page else {}),
                }
                for page in pages
            ],
        }
    if examples:
        groups = {}
        for kind in KINDS:
            chosen = [j for j, row in enumerate(rows) if row["intent"] == kind][:examples]
            sheets = []
            for j in chosen:
                path = f"{EXAMPLES}/{GROUP_FOLDERS[kind]}/{_stem(kept[j], items[kept[j]].file)}.png"
                files[path] = _encoded(
                    _sheet(
                        j,
                        image(j),
                        grid_map(j),
                        rows,
                        records[kept[j]]["look"],
                        pruned,
                        items[kept[j]].box,
                        settings["after_block"],
                        name,
                    ),
                    "PNG",
                )
                sheets.append(path)
            groups[kind] = {
                "folder": f"{EXAMPLES}/{GROUP_FOLDERS[kind]}",
                "n": sum(r["intent"] == kind for r in rows),
                "sheets": sheets,
            }
        parts["examples"] = {"per_group": examples, "groups": groups}
    return parts, files


def _sheet(j, picture, grid_map, rows, look, pruned, object_box, after_block, name) -> Image.Image:
    """Position j's example sheet, its caption saying every prediction before and after."""
    row = rows[j]
    verdict = lambda cls: "right" if cls == row["label"] else "wrong"
    said = lambda cls, confidence: f"'{name(cls)}' {confidence:.1%} ({verdict(cls)})"
    metrics = [f"spread {row['intent_spread']:.0%}", f"focus {row['intent_focus']:.0%}"]
    if "intent_mass_inside_box" in row:
        metrics.append(f"{row['intent_mass_inside_box']:.0%} of the importance inside the object box")
    if "intent_crop_confidence_ratio" in row:
        metrics.append(f"crop confidence ratio {row['intent_crop_confidence_ratio']:.2f} of the white box")
    region = tuple(row.get(f"intent_region_{k}", np.nan) for k in BOX_COLUMNS)
    region = None if np.isnan(region).any() else region  # none judged (diffuse); a CSV's empty cell reads as NaN
    masks, looks = [], []
    for mode, criterion, keep in INTENT_CONFIGS:
        run = pruned[mode, criterion, keep]
        mask = np.zeros(grid_map.size, dtype=bool)
        mask[run.kept[j]] = True
        masks.append(mask.reshape(grid_map.shape))
        looks.append(f"{mode} mode ({criterion}) {said(int(run.predicted[j]), float(run.confidence[j]))}")
    caption = (
        f"{row['file']}: label '{name(row['label'])}'. Intent: {GROUP_NAMES[row['intent']]} ({', '.join(metrics)}).\n"
        f"Prediction {said(row['predicted'], row['confidence'])}. Zoom "
        f"({'zoomed in' if look['zoomed'] else 'kept the whole image'}): {said(look['predicted'], look['confidence'])}."
        f" Pruning at keep {INTENT_CONFIGS[0][2]:g} after block {after_block}: {'; '.join(looks)}.\n"
        "Panels: the image (red: zoom box"
        + (", green: object box" if object_box is not None else "")
        + ") · the intent map of the prediction (colour bar"
        + ("; white: the region the diagnosis judged" if region is not None else "")
        + ") · the zoom crop · the tokens kept in analysis mode · in efficiency mode (grey: dropped)."
    )
    return example_sheet(*picture, grid_map, look["box"], masks, object_box, caption, region)
