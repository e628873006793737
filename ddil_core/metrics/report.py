"""Report layer: report.md and report.html of an evaluation (its images are plots.py's).

What a reader sees, in this order: the gate verdict (pass or fail, each gate with its threshold), the metrics table
with readable names, which FID this is, the quality-vs-steps plot, the teacher's and the students' samples side by
side (one row per prompt, labelled with it, the same seeds in every column), every sample grid, the protocol.
Plain string templating; the HTML is self-contained apart from images referenced by relative paths, so the folder
can be opened or published as it is.
"""
from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import numpy as np
import torch

from ddil_core.config.redaction import redact_string

# Metric key -> display label; keys not listed are shown as they are, after these.
METRIC_LABELS = {
    "fid": "FID ↓ (see “Which FID”)",
    "fid_torchmetrics": "FID, torchmetrics' cross-check on the same features",
    "precision": "Precision ↑",
    "recall": "Recall ↑",
    "density": "Density ↑",
    "coverage": "Coverage ↑",
    "adherence": "Prompt adherence ↑ (share of images of the prompted class)",
    "diversity": "Diversity (mean pairwise feature distance within a prompt)",
    "nfe_per_image": "UNet calls (NFE) per image",
    "seconds_per_image": "Seconds per image",
    "speedup_nfe": "Speed-up in UNet calls (teacher ÷ this model)",
    "speedup_seconds": "Speed-up in seconds (teacher ÷ this model)",
    "steps": "Sampling steps",
    "guidance_scale": "Guidance scale",
    "num_images": "Images generated",
}
MISSING = "—"


# ----------------------------------------------------------------------------------------- helpers
def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(redact_string(text).encode("utf-8"))  # no secret is ever written (config/redaction.py)
    os.replace(tmp, path)  # readers never see a half-written file


def format_value(v) -> str:
    """Numbers to short text; None / NaN / inf-less garbage to a dash."""
    if v is None:
        return MISSING
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return MISSING
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(format_value(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    return str(v)


def model_label(key: str, metrics: dict) -> str:
    """'student@1' with steps 1 -> 'student, 1 step'; 'teacher' with steps 50 -> 'teacher, 50 steps'."""
    steps = metrics.get("steps") if isinstance(metrics, dict) else None
    name = key.split("@", 1)[0]
    if isinstance(steps, int) and not isinstance(steps, bool):
        return f"{name}, {steps} step{'' if steps == 1 else 's'}"
    return key


def _metric_keys(models: dict) -> list[str]:
    present = {k for m in models.values() for k in m}
    known = [k for k in METRIC_LABELS if k in present]
    extra = sorted(present - set(METRIC_LABELS))
    return known + extra


def _relative_src(out_dir: Path, name: str) -> str:
    p = Path(name)
    rel = os.path.relpath(p, out_dir) if p.is_absolute() else str(p)
    return Path(rel).as_posix()


def _verdict_line(verdict: dict) -> str:
    gates = verdict.get("gates") or []
    if not gates:
        return "No quality gates are set (registry.gates): register accepts any evaluation."
    failed = [g for g in gates if not g.get("passed")]
    if failed:
        return (f"FAIL: {len(failed)} of {len(gates)} gates failed ({', '.join(g['name'] for g in failed)}); "
                "register refuses this student.")
    return f"PASS: the student clears all {len(gates)} gates; register accepts it."


# ----------------------------------------------------------------------------------------- markdown
def _md_list(d: dict, indent: int = 0) -> list[str]:
    lines = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            lines.append(" " * indent + f"- **{k}**:")
            lines += _md_list(v, indent + 2)
        else:
            lines.append(" " * indent + f"- **{k}**: `{format_value(v)}`")
    return lines


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")


def render_markdown(metrics: dict, grids: dict, plot: Optional[str], title: str, out_dir: Path,
                    verdict: Optional[dict] = None, comparison: Optional[dict] = None,
                    fid_note: Optional[str] = None, figures: Optional[dict] = None) -> str:
    models = metrics.get("models") or {}
    src = lambda name: quote(_relative_src(out_dir, name))  # noqa: E731
    lines = [f"# {title}", ""]
    if verdict is not None:
        lines += ["## Verdict", "", f"**{_verdict_line(verdict)}**", ""]
        if verdict.get("gates"):
            lines += ["| gate | checks | student | threshold | result |", "|---|---|---:|---:|---|"]
            for g in verdict["gates"]:
                lines.append(f"| {g['name']} | {_md_cell(g.get('checks', ''))} | {format_value(g.get('actual'))} | "
                             f"{format_value(g.get('threshold'))} | {'pass' if g.get('passed') else 'FAIL'} |")
            lines.append("")
    if models:
        lines += ["## Metrics", "",
                  "| metric | " + " | ".join(_md_cell(model_label(k, m)) for k, m in models.items()) + " |",
                  "|---|" + "---:|" * len(models)]
        for k in _metric_keys(models):
            cells = [_md_cell(format_value(m.get(k))) for m in models.values()]
            lines.append(f"| {_md_cell(METRIC_LABELS.get(k, k))} | " + " | ".join(cells) + " |")
        lines.append("")
    if fid_note:
        lines += ["## Which FID", "", fid_note, ""]
    if plot:
        lines += ["## Quality vs steps", "", f"![FID vs steps]({src(plot)})", ""]
    for heading, figs in (figures or {}).items():
        lines += [f"## {heading}", ""] + [f"![{caption}]({src(name)})" for caption, name in figs.items()] + [""]
    if comparison and comparison.get("rows"):
        cols = comparison["columns"]
        lines += ["## Samples side by side", "", comparison.get("caption", ""), "",
                  "| prompt | " + " | ".join(_md_cell(c) for c in cols) + " |", "|---|" + "---|" * len(cols)]
        for row in comparison["rows"]:
            cells = [f"![{_md_cell(c)}: {_md_cell(row['prompt'])}]({src(img)})" for c, img in zip(cols, row["images"])]
            lines.append(f"| {_md_cell(row['prompt'])} | " + " | ".join(cells) + " |")
        lines.append("")
    if grids:
        lines += ["## Every sample grid", "", "Rows are prompts (labelled), columns are seeds.", ""]
        for caption, name in grids.items():
            lines += [f"![{caption}]({src(name)})", "", f"*{caption}*", ""]
    if metrics.get("protocol"):
        lines += ["## Protocol", ""] + _md_list(metrics["protocol"]) + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- html
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222; max-width: 1200px;
       margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
h1 { font-size: 1.6rem; border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { border: 1px solid #ddd; padding: .35rem .8rem; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f4f4f4; }
tbody th { text-align: left; font-weight: 600; background: #fafafa; }
p.verdict { font-size: 1.1rem; font-weight: 700; padding: .5rem .8rem; border-radius: 4px; }
p.pass { background: #e6f4ea; color: #1e6b34; } p.fail { background: #fce8e6; color: #a50e0e; }
p.none { background: #f4f4f4; }
td.pass { color: #1e6b34; font-weight: 600; } td.fail { color: #a50e0e; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; }
dt { font-weight: 600; } dd { margin: 0; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .9rem; }
dl dl { margin: 0; }
figure { margin: 1rem 0 1.5rem; }
.scroll { overflow-x: auto; }
table.samples td { padding: .2rem; } table.samples img { border: 0; display: block; }
.grids { display: flex; flex-wrap: wrap; gap: 0 2rem; align-items: flex-start; }
img { image-rendering: pixelated; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #555; font-size: .9rem; margin-top: .3rem; }
"""


def _html_dl(d: dict) -> str:
    items = []
    for k, v in d.items():
        inner = _html_dl(v) if isinstance(v, dict) and v else html.escape(format_value(v))
        items.append(f"<dt>{html.escape(str(k))}</dt><dd>{inner}</dd>")
    return "<dl>" + "".join(items) + "</dl>"


def render_html(metrics: dict, grids: dict, plot: Optional[str], title: str, out_dir: Path,
                verdict: Optional[dict] = None, comparison: Optional[dict] = None,
                fid_note: Optional[str] = None, figures: Optional[dict] = None) -> str:
    e = html.escape
    src = lambda name: e(quote(_relative_src(out_dir, name)))  # noqa: E731
    models = metrics.get("models") or {}
    body = [f"<h1>{e(title)}</h1>"]
    if verdict is not None:
        gates = verdict.get("gates") or []
        kind = "none" if not gates else ("pass" if all(g.get("passed") for g in gates) else "fail")
        body += ['<h2 id="verdict">Verdict</h2>', f'<p class="verdict {kind}">{e(_verdict_line(verdict))}</p>']
        if gates:
            rows = "".join(
                f'<tr><th>{e(g["name"])}</th><td>{e(g.get("checks", ""))}</td>'
                f'<td class="num">{e(format_value(g.get("actual")))}</td>'
                f'<td class="num">{e(format_value(g.get("threshold")))}</td>'
                f'<td class="{"pass" if g.get("passed") else "fail"}">{"pass" if g.get("passed") else "FAIL"}</td></tr>'
                for g in gates)
            body.append('<table class="gates"><thead><tr><th>gate</th><th>checks</th><th>student</th>'
                        f"<th>threshold</th><th>result</th></tr></thead><tbody>{rows}</tbody></table>")
    if models:
        head = "".join(f"<th>{e(model_label(k, m))}</th>" for k, m in models.items())
        rows = []
        for k in _metric_keys(models):
            cells = "".join(f'<td class="num">{e(format_value(m.get(k)))}</td>' for m in models.values())
            rows.append(f"<tr><th>{e(METRIC_LABELS.get(k, k))}</th>{cells}</tr>")
        body += ['<h2 id="metrics">Metrics</h2>', '<div class="scroll"><table class="metrics"><thead><tr>'
                 f"<th>metric</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"]
    if fid_note:
        body += ['<h2 id="which-fid">Which FID</h2>', f'<p class="fid-note">{e(fid_note)}</p>']
    if plot:
        body += ["<h2>Quality vs steps</h2>",
                 f'<figure><img src="{src(plot)}" alt="FID vs steps"><figcaption>FID against sampling steps'
                 "</figcaption></figure>"]
    for heading, figs in (figures or {}).items():
        body += [f"<h2>{e(heading)}</h2>"] + [f'<figure><img src="{src(name)}" alt="{e(caption)}"><figcaption>'
                                              f"{e(caption)}</figcaption></figure>" for caption, name in figs.items()]
    if comparison and comparison.get("rows"):
        cols = comparison["columns"]
        head = "".join(f'<th scope="col">{e(c)}</th>' for c in cols)
        rows = []
        for row in comparison["rows"]:
            cells = "".join(f'<td><img src="{src(img)}" alt="{e(c)}: {e(row["prompt"])}"></td>'
                            for c, img in zip(cols, row["images"]))
            rows.append(f'<tr><th scope="row">{e(row["prompt"])}</th>{cells}</tr>')
        body += ['<h2 id="samples">Samples side by side</h2>', f"<p>{e(comparison.get('caption', ''))}</p>",
                 '<div class="scroll"><table class="samples"><thead><tr><th scope="col">prompt</th>'
                 f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"]
    if grids:
        figs = [f'<figure><img src="{src(name)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>'
                for caption, name in grids.items()]
        body += ["<h2>Every sample grid</h2>", "<p>Rows are prompts (labelled), columns are seeds.</p>",
                 '<div class="grids">' + "".join(figs) + "</div>"]
    if metrics.get("protocol"):
        body += ["<h2>Protocol</h2>", _html_dl(metrics["protocol"])]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{e(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(out_dir, metrics: dict, grids: dict[str, str], plot: Optional[str] = None,
                 title: str = "DDIL evaluation report", *, verdict: Optional[dict] = None,
                 comparison: Optional[dict] = None, fid_note: Optional[str] = None,
                 figures: Optional[dict] = None) -> tuple[Path, Path]:
    """Write report.md and report.html into out_dir; images are referenced by paths relative to it.

    metrics: {"protocol": {...}, "models": {name: {metric: value}}}, any subset of keys; None/NaN -> "—".
    grids: caption -> PNG file name relative to out_dir. plot: optional PNG name relative to out_dir.
    verdict: {"gates": [{name, checks, actual, threshold, passed}, ...]} (an empty list: no gates set).
    comparison: {"columns": [model labels], "rows": [{"prompt", "images": [one PNG per column]}], "caption"}.
    fid_note: one paragraph on which FID the table shows.
    figures: heading -> {caption: PNG name}, a section each after the quality plot (the covariate-shift curves).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    extra = dict(verdict=verdict, comparison=comparison, fid_note=fid_note, figures=figures)
    _atomic_write_text(md_path, render_markdown(metrics, grids, plot, title, out_dir, **extra))
    _atomic_write_text(html_path, render_html(metrics, grids, plot, title, out_dir, **extra))
    return md_path, html_path
