"""The outputs of a `zoomvit eval` run: results.json, per_image.csv, the PNG plots and report.md (`write_outputs`),
with the gallery and example sheets when asked for (see `eval_gallery`), the Markdown tables (`markdown_report`, what
the README's Results section is pasted from) and the goal checks."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from zoomvit import visualization
from zoomvit.errors import ZoomViTError
from zoomvit.evaluation import gallery as eval_gallery
from zoomvit.evaluation import sanity as eval_sanity
from zoomvit.evaluation.tasks import INTENT_KEEP


@dataclass
class Evaluation:
    summary: dict  # what results.json holds
    rows: list[dict]  # one per evaluated image: the per-image CSV
    files: dict = field(default_factory=dict)  # the gallery's and example sheets' files: {path under OUT: bytes}


PLOTS = {"prune": "prune.png", "zoom": "zoom.png", "faithfulness": "faithfulness.png", "sanity": "sanity.png"}
OUTPUTS = ("results.json", "per_image.csv", *PLOTS.values(), "report.md")  # every file `write_outputs` writes


def earlier_outputs(out_dir) -> list[Path]:
    """The files of `OUTPUTS` that `out_dir` holds already, and its gallery and examples folders where they hold
    eval's pictures: an earlier run's, which a new run would mix with its own (its plots of other tasks, its sheets
    of other images would stay)."""
    files = [path for path in map(Path(out_dir).joinpath, OUTPUTS) if path.is_file()]
    return files + eval_gallery.earlier_pictures(out_dir)


def remove_outputs(out_dir) -> None:
    """An earlier run's outputs removed (`OUTPUTS` and eval's pictures only: whatever else the folder holds is not
    eval's)."""
    for path in earlier_outputs(out_dir):
        if path.is_file():
            path.unlink()
    eval_gallery.remove_pictures(out_dir)


def write_outputs(result: Evaluation, out_dir) -> list[Path]:
    """results.json, per_image.csv, the plots of the tasks that ran, and report.md; returns the paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZoomViTError(f"Could not create {out}: {exc}") from None
    summary = result.summary
    written = [out / "results.json", out / "per_image.csv"]
    written[0].write_text(json.dumps(summary, indent=1) + "\n")
    columns = list(dict.fromkeys(k for row in result.rows for k in row))
    with open(written[1], "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(result.rows)
    figures = {
        "prune": visualization.plot_pruning,
        "zoom": visualization.plot_zoom,
        "faithfulness": visualization.plot_faithfulness,
        "sanity": visualization.plot_sanity,
    }
    for task, name in PLOTS.items():
        if task in summary:
            figures[task](summary).savefig(out / name, dpi=110)
            written.append(out / name)
    eval_gallery.remove_pictures(out)  # a resumed run may ask for other pictures than the interrupted one wrote
    written += eval_gallery.write_pictures(result.files, out)
    (out / "report.md").write_text(markdown_report(summary))
    written.append(out / "report.md")
    return written


# The engine and evaluation issues' goals on DeiT-Tiny (points are top-1 percentage points).
GOALS = {
    ("analysis", 0.3): 1.0,
    ("analysis", 0.1): 5.0,  # max drop, intent criterion
    ("efficiency", 0.5): 1.5,
    ("efficiency", 0.3): 5.0,  # max drop, merge criterion
}
LATENCY_SLACK = 0.05


def _zoom_policy(summary) -> str:
    """The zoom policy a run used; runs from before the choice existed used the adaptive one."""
    return summary["settings"].get("zoom_policy", "adaptive")


ZOOM_GOALS = {"overall": 0.55, "blur": 0.65, "pointing_game": 0.85}
FAITHFULNESS_MARGIN = 3.0  # best map's deletion AUC (points) at least this far below rollout's


def _shown(value: float, spec: str) -> tuple[str, Decimal]:
    """`value` as the report prints it, and that printed figure as an exact number: a goal is met or missed on
    what the report shows (100 x (0.85 - 0.9) is -5.000000000000004, a drop shown and meant as 5.0)."""
    text = format(value, spec)
    return text, Decimal(text.rstrip("%"))


NOT_MEASURED = "not measured"  # a latency that eval --no-timing skipped, in the tables and the goals


def goal_checks(summary: dict) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) for every goal the summary has figures for, judged on the figures as printed; met is
    None for a goal on a figure the run did not measure (latency under --no-timing)."""
    checks = []
    for entry in summary.get("prune", []):
        ours = "intent" if entry["mode"] == "analysis" else "merge"
        limit = GOALS.get((entry["mode"], entry["keep"]))
        if entry["criterion"] != ours or limit is None:
            continue
        change, shown_change = _shown(100 * (entry["top1"] - summary["top1"]), "+.1f")
        checks.append(
            (
                f"{entry['mode']} pruning, keep {entry['keep']:g}: top-1 drop <= {limit:g} points",
                f"{change} points",
                -shown_change <= Decimal(f"{limit:g}"),
            )
        )
        if entry["mode"] == "efficiency":
            goal = f"efficiency keep {entry['keep']:g}: latency ratio <= MACs ratio + {LATENCY_SLACK}"
            if entry["latency_ratio"] is None:  # eval --no-timing
                checks.append((goal, NOT_MEASURED, None))
                continue
            latency, macs = _shown(entry["latency_ratio"], ".2f"), _shown(entry["macs_ratio"], ".2f")
            checks.append((goal, f"{latency[0]} vs {macs[0]}", latency[1] <= macs[1] + Decimal(f"{LATENCY_SLACK}")))
    z = summary.get("zoom")
    if z and "pointing_game" in z:
        goals = [
            (f"top-1 after {_zoom_policy(summary)} zoom >= {ZOOM_GOALS['overall']:.0%}", z["top1_after"], "overall"),
        ]
        blur = z.get("groups", {}).get("background", {}).get("blur")
        if blur:
            goals.append((f"blur items: top-1 after zoom >= {ZOOM_GOALS['blur']:.0%}", blur["top1_after"], "blur"))
        goals.append(
            (
                f"map peak inside the object box >= {ZOOM_GOALS['pointing_game']:.0%}",
                z["pointing_game"],
                "pointing_game",
            )
        )
        for goal, value, key in goals:
            measured, shown = _shown(value, ".1%")
            checks.append((goal, measured, shown >= _shown(ZOOM_GOALS[key], ".0%")[1]))
    elif z:
        before, after = _shown(z["top1_before"], ".1%"), _shown(z["top1_after"], ".1%")
        checks.append(
            (
                f"top-1 with {_zoom_policy(summary)} zoom not lower than without",
                f"{before[0]} -> {after[0]}",
                after[1] >= before[1],
            )
        )
    faith = {e["method"]: e for e in summary.get("faithfulness", [])}
    if "rollout" in faith:
        best = min((e for m, e in faith.items() if m != "random"), key=lambda e: e["deletion_auc"])
        gap, shown_gap = _shown(100 * (faith["rollout"]["deletion_auc"] - best["deletion_auc"]), ".2f")
        checks.append(
            (
                f"best map's deletion AUC <= rollout's - {FAITHFULNESS_MARGIN:g} points",
                f"{best['method']} {100 * best['deletion_auc']:.2f} vs rollout "
                f"{100 * faith['rollout']['deletion_auc']:.2f} ({gap} points better)",
                shown_gap >= Decimal(f"{FAITHFULNESS_MARGIN:g}"),
            )
        )
    return checks


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _signed(x) -> str:
    return "–" if x is None else f"{100 * x:+.1f}"


def markdown_report(summary: dict, link_base: str = "") -> str:
    """The tables of one run, in Markdown (what the README's Results section is pasted from). `link_base` prefixes
    the links to the gallery and the example sheets: the report's folder as seen from where it is pasted."""
    s = summary
    lines = [f"**{Path(s['data']).name}**, n = {s['n']}, model `{s['model']}`: top-1 {_pct(s['top1'])}.", ""]
    if s["skipped"]:
        lines += [f"Skipped (unreadable): {len(s['skipped'])} files.", ""]
    if "prune" in s:
        timed = s["settings"].get("timing", True)  # runs from before --no-timing were all timed
        lines += [
            f"Pruning after block {s['settings']['after_block']} (top-1 change in points; "
            + (f"latency at batch {s['settings']['prune_batch']}" if timed else "latency not measured: --no-timing")
            + "):",
            "",
            "| mode | criterion | keep | top-1 | change | agreement | MACs ratio | latency ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in s["prune"]:
            lines.append(
                f"| {e['mode']} | {e['criterion']} | {e['keep']:g} | {_pct(e['top1'])} | "
                f"{_signed(e['top1'] - s['top1'])} | {_pct(e['agreement'])} | {e['macs_ratio']:.2f} | "
                f"{NOT_MEASURED if e['latency_ratio'] is None else format(e['latency_ratio'], '.2f')} |"
            )
        lines.append("")
    if "zoom" in s:
        z = s["zoom"]
        boxes = "pointing_game" in z
        units = z.get("forward_units") is not None  # runs before the cost was counted have none
        lines += [
            f"{_zoom_policy(s).capitalize()} zoom (crop: the crop's own prediction, for comparison"
            + (
                "; forward units: the zoom's block multiply-adds per image, one full-size forward = 1, the analysis "
                "pass included"
                if units
                else ""
            )
            + "):",
            "",
            "| items | n | top-1 before | top-1 after | crop only | zoomed |"
            + (" pointing game | box IoU |" if boxes else "")
            + (" forward units |" if units else ""),
            "|---|---|---|---|---|---|" + ("---|---|" if boxes else "") + ("---|" if units else ""),
        ]
        blocks = [("all", z)] + [(f"{col} = {v}", b) for col, g in z.get("groups", {}).items() for v, b in g.items()]
        for name, b in blocks:
            lines.append(
                f"| {name} | {b['n']} | {_pct(b['top1_before'])} | {_pct(b['top1_after'])} | "
                f"{_pct(b['top1_crop'])} | {_pct(b['zoomed_fraction'])} |"
                + (f" {_pct(b['pointing_game'])} | {b['box_iou']:.3f} |" if boxes else "")
                + (f" {b['forward_units']:.2f} |" if units else "")
            )
        lines.append("")
    if "faithfulness" in s:
        boxes = any("pointing_game" in e for e in s["faithfulness"])
        lines += [
            "Faithfulness (AUC × 100 of the predicted class's probability; deletion lower is better, insertion "
            "higher):",
            "",
            "| map | deletion AUC | insertion AUC |" + (" pointing game |" if boxes else ""),
            "|---|---|---|" + ("---|" if boxes else ""),
        ]
        for e in s["faithfulness"]:
            lines.append(
                f"| {e['method']} | {100 * e['deletion_auc']:.2f} | {100 * e['insertion_auc']:.2f} |"
                + (f" {_pct(e.get('pointing_game'))} |" if boxes else "")
            )
        lines.append("")
    if "intent" in s:
        lines += [
            f"Intent groups: what pruning at keep {INTENT_KEEP:g} and {_zoom_policy(s)} zoom do (confidence = "
            "probability of the unpruned prediction; changes in points):",
            "",
            "| intent | n | top-1 | confidence | second look | top-1 after | agreement | confidence change "
            "(right / wrong) | errors kept | errors fixed |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for kind, g in s["intent"].items():
            looks = [(f"prune {m}", g[f"prune_{m}"]) for m in ("analysis", "efficiency")]
            looks += [("zoom", g["zoom"])] if "zoom" in g else []
            for i, (name, c) in enumerate(looks):
                head = f"| {kind} | {g['n']} | {_pct(g['top1'])} | {_pct(g['confidence'])} |" if i == 0 else "| | | | |"
                lines.append(
                    f"{head} {name} | {_pct(c['top1'])} | {_pct(c['agreement'])} | "
                    f"{_signed(c['confidence_change'])} ({_signed(c['confidence_change_correct'])} / "
                    f"{_signed(c['confidence_change_wrong'])}) | {_pct(c['errors_kept'])} | "
                    f"{_pct(c['errors_fixed'])} |"
                )
        lines.append("")
    if "sanity" in s:
        lines += _sanity_report(s["sanity"])
    lines += _pictures_report(s, link_base)
    checks = goal_checks(s)
    if checks:
        lines += ["Goals:", "", "| goal | measured | |", "|---|---|---|"]
        verdicts = {True: "met", False: "MISSED", None: NOT_MEASURED}
        lines += [f"| {goal} | {measured} | {verdicts[met]} |" for goal, measured, met in checks]
        lines.append("")
    sp = s["speed"]
    lines.append(
        f"Analysis pass {sp['analysis_ms_median']:.1f} ms per image (median); whole run "
        f"{sp['total_seconds'] / 60:.1f} min on {s['machine']['threads']} threads "
        f"({s['machine']['processor']}, torch {s['machine']['torch']})."
    )
    return "\n".join(lines) + "\n"


def _sanity_report(sanity: dict) -> list[str]:
    """The sanity checks' table: one row per map, one column per randomisation level, and the verdicts."""
    levels = sanity["levels"]
    shown = [name if name in ("none", "head") else name.removeprefix("head") for name in levels]
    lines = [
        "Sanity checks (Adebayo et al. 2018, model randomisation): the weights randomised from the top, cumulatively "
        "(head = the classifier; +10-12: the classifier and blocks 10 to 12), each map computed again for the "
        "intact model's class. Spearman rank correlation with the intact model's map, mean over the images; "
        f"rule: {sanity['rule']}.",
        "",
        "| map | " + " | ".join(shown) + " | verdict |",
        "|---|" + "---|" * (len(levels) + 1),
    ]
    for e in sanity["maps"]:
        lines.append(
            f"| {e['map']} | " + " | ".join(f"{v:.2f}" for v in e["spearman"]) + f" | {eval_sanity.verdict(e)} |"
        )
    return lines + [""]


def _pictures_report(s: dict, base: str = "") -> list[str]:
    """The links to the gallery's pages and the example sheets, with what each intent group's second looks did."""
    lines = []
    if "gallery" in s:
        lines += [
            f"Gallery: the first {s['gallery']['per_page']} images of each list, with the image and the intent "
            "map of its prediction:",
            "",
        ]
        for page in s["gallery"]["pages"]:
            counts = eval_gallery.change_counts(page.get("changes", {}))
            what = "predicted wrong" if page["task"] == "accuracy" else "changed"
            lines.append(
                f"- [{page['title']}]({base}{page['page']}): {page['images']} {what}"
                + (f" ({counts})" if counts else "")
            )
        lines.append("")
    if "examples" in s:
        groups = s["examples"]["groups"]
        looks = [("prune analysis", "prune_analysis"), ("prune efficiency", "prune_efficiency")]
        looks += [("zoom", "zoom")] if any("zoom" in g for g in s["intent"].values()) else []
        lines += [
            f"Example sheets (the first {s['examples']['per_group']} images of each intent group): what pruning "
            f"at keep {INTENT_KEEP:g} and {_zoom_policy(s)} zoom did to each group on average (top-1 change / "
            "confidence change, in points):",
            "",
            "| intent group | images | sheets | " + " | ".join(name for name, _ in looks) + " |",
            "|---|---|---|" + "---|" * len(looks),
        ]
        for kind, group in groups.items():
            g = s["intent"][kind]
            changes = [
                (g[key]["top1"] - g["top1"] if g["n"] else None, g[key]["confidence_change"]) for _, key in looks
            ]
            sheets = f"[{len(group['sheets'])}]({base}{group['folder']}/)" if group["sheets"] else "0"
            lines.append(
                f"| {eval_gallery.GROUP_NAMES[kind]} | {group['n']} ({_pct(g['fraction'])}) | {sheets} | "
                + " | ".join(f"{_signed(top1)} / {_signed(conf)}" for top1, conf in changes)
                + " |"
            )
        lines.append("")
    return lines
