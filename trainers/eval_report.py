"""The HTML page of ``python -m trainers evaluate``: one self-contained file (styles and the plot
inlined; the rendered images referenced beside it under ``images/``; nothing from a network)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from core.fileio import write_text_atomic

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0;background:#fff}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;font-size:13px}
th{background:#eee}td.name,th:first-child{text-align:left}
code{background:#eee;padding:2px 4px;display:block;white-space:pre-wrap;word-break:break-all}
.grid td{padding:2px;text-align:center;vertical-align:top}.grid img{width:128px;height:128px;image-rendering:pixelated}
.muted{color:#777}
"""

LABELS = {"face_confidence": "Face Confi.", "hand_confidence": "Hand Confi.", "pickscore": "PickScore",
          "hps": "HPS", "imagereward": "ImageReward", "clipscore": "CLIP score"}


def _num(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _level(row) -> str:
    strength = row["strength"]
    return "–" if strength is None else ("all" if strength == "all" else f"{strength:g}")


def metric_table(report: dict) -> str:
    extra = [m for m in report["metrics"] if m not in ("face_confidence", "hand_confidence")]
    head = ("<tr><th>model</th><th>strength</th><th>images</th><th>Face Confi.</th><th>faces found in</th>"
            "<th>Hand Confi.</th><th>hands found in</th><th>color shift H / S / V (%)</th>"
            + "".join(f"<th>{LABELS.get(m, m)}</th>" for m in extra) + "</tr>")
    body = []
    for row in report["rows"]:
        shift = row["color_shift"]
        body.append(
            f"<tr><td class=name>{html.escape(row['model'])}</td><td>{_level(row)}</td><td>{row['images']}</td>"
            f"<td>{_num(row['face_confidence'])}</td><td>{row['face_detection_rate']:.0%}</td>"
            f"<td>{_num(row['hand_confidence'])}</td><td>{row['hand_detection_rate']:.0%}</td>"
            f"<td>{shift['hue']:.1f} / {shift['saturation']:.1f} / {shift['value']:.1f}</td>"
            + "".join(f"<td>{_num(row.get(m))}</td>" for m in extra) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def win_table(report: dict) -> str:
    head = "<tr><th>metric</th><th>A</th><th>B</th><th>A wins</th><th>ties</th><th>B wins</th><th>A's win rate (95% CI)</th></tr>"
    body = [f"<tr><td class=name>{LABELS.get(w['metric'], w['metric'])}</td><td class=name>{html.escape(w['a'])}</td>"
            f"<td class=name>{html.escape(w['b'])}</td><td>{w['wins']}</td><td>{w['ties']}</td><td>{w['losses']}</td>"
            + (f"<td>{w['rate']:.2f} ({w['low']:.2f}–{w['high']:.2f}) of {w['prompts']} prompts</td></tr>"
               if w["prompts"] else "<td class=muted>no prompt where both have a value</td></tr>")
            for w in report["win_rates"]]
    return f"<table>{head}{''.join(body)}</table>"


def confidence_plot(report: dict) -> str:
    """Face and hand confidence by strength per model, as an inlined PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    rows = [r for r in report["rows"] if r["strength"] != "all"]
    base = next(r for r in rows if r["strength"] is None)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, region in zip(axes, ("face", "hand")):
        confidence, rate = f"{region}_confidence", f"{region}_detection_rate"
        models = list(dict.fromkeys(r["model"] for r in rows if r["strength"] is not None))
        for color, model in zip(colors, models):
            mine = sorted((r["strength"], r) for r in rows if r["model"] == model)
            ax.plot([s for s, _ in mine], [r[rate] for _, r in mine], color=color, linestyle=":", marker="x",
                    label=f"{model}: found in")
            points = [(s, r[confidence]) for s, r in mine if r[confidence] is not None]
            if points:
                ax.plot(*zip(*points), color=color, marker="o", label=f"{model}: confidence")
        ax.axhline(base[rate], color="gray", linestyle=":", label="base: found in")
        if base[confidence] is not None:
            ax.axhline(base[confidence], color="gray", linestyle="--", label="base: confidence")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{LABELS[confidence]} and detection rate")
        ax.set_xlabel("LoRA strength")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_grids(report: dict) -> str:
    by_key = {(i["model"], i["strength"], i["prompt"], i["seed"]): i["path"] for i in report["images"]}
    columns = [("base", None)] + [(m["name"], s) for m in report["models"] for s in report["strengths"]]
    head = "<tr><th>seed</th>" + "".join(
        f"<th>{html.escape(m)}{'' if s is None else f' @ {s:g}'}</th>" for m, s in columns) + "</tr>"
    parts = []
    for k, prompt in enumerate(report["prompts"]):
        rows = []
        for seed in report["seeds"]:
            cells = "".join(
                f"<td><img src=\"{html.escape(by_key[(m, s, k, seed)])}\" alt=\"{html.escape(m)} seed {seed}\"></td>"
                for m, s in columns)
            rows.append(f"<tr><td>{seed}</td>{cells}</tr>")
        parts.append(f"<h3>{k + 1}. {html.escape(prompt)}</h3><table class=grid>{head}{''.join(rows)}</table>")
    return "".join(parts)


def write_html(path: Path, report: dict) -> Path:
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation: {html.escape(report['base'])}</title>
<style>{STYLE}</style></head><body>
<h1>Evaluation of {len(report['models'])} LoRA(s) against {html.escape(report['base'])}</h1>
<p class=muted>{len(report['prompts'])} prompts × {len(report['seeds'])} seeds, strengths
{', '.join(f'{s:g}' for s in report['strengths'])}. Face/Hand Confi.: mean detection / handedness confidence over
detected faces / hands, with the share of images where any was found. Color shift from the base: the angle
between the mean hues in % of a full turn, and the % change of the saturation and value means. Win rate: per prompt, the mean over seeds and strengths; a tie counts half.</p>
<h2>Metrics</h2>{metric_table(report)}
<h2>Confidence by strength</h2><img alt="confidence by strength" src="{confidence_plot(report)}">
<h2>Win rates</h2>{win_table(report)}
<h2>Images</h2>{image_grids(report)}
<h2>Command</h2><code>{html.escape(report['command'])}</code>
</body></html>
"""
    write_text_atomic(path, page)
    return path
