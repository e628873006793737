"""Report layer: image grids, a quality-vs-steps plot and report.md / report.html.

Pure PIL + string templating: matplotlib is not part of the environment, and the HTML is self-contained
apart from images referenced by relative paths, so the folder can be opened or published as it is.
"""
from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Metric key -> display label; keys not listed are shown as they are, after these.
METRIC_LABELS = {
    "fid": "FID ↓",
    "precision": "Precision ↑",
    "recall": "Recall ↑",
    "density": "Density ↑",
    "coverage": "Coverage ↑",
    "adherence": "Prompt adherence ↑",
    "diversity": "Diversity (mean pairwise distance)",
    "nfe_per_image": "NFE / image",
    "seconds_per_image": "Seconds / image",
    "steps": "Steps",
    "guidance_scale": "Guidance scale",
}
MISSING = "—"


# ----------------------------------------------------------------------------------------- helpers
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # readers never see a half-written file


def _atomic_save_png(img: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # FreeType build: scalable default font
    except (TypeError, OSError):
        return ImageFont.load_default()


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


def _metric_keys(models: dict) -> list[str]:
    present = {k for m in models.values() for k in m}
    known = [k for k in METRIC_LABELS if k in present]
    extra = sorted(present - set(METRIC_LABELS))
    return known + extra


def _relative_src(out_dir: Path, name: str) -> str:
    p = Path(name)
    rel = os.path.relpath(p, out_dir) if p.is_absolute() else str(p)
    return Path(rel).as_posix()


# ----------------------------------------------------------------------------------------- grid
def _to_pil(x) -> Image.Image:
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.detach().cpu()
    if t.dim() == 2:
        t = t[None]
    if t.dtype != torch.uint8:  # float images are in [0, 1]
        t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return Image.fromarray(t.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def save_grid(images, path, pad: int = 4, background=(255, 255, 255), ncols: Optional[int] = None,
              upscale: int = 1) -> Path:
    """One PNG grid, rows = prompts, columns = seeds.

    images: list of rows of PIL images (or [3, H, W] tensors), or a tensor [rows, cols, C, H, W], or a
    tensor [N, C, H, W] with `ncols`. Float tensors are read as [0, 1]; uint8 as is.
    upscale: integer nearest-neighbour zoom of every cell (8x8 or 16x16 samples are unreadable otherwise).
    Size: cols * w + (cols + 1) * pad by rows * h + (rows + 1) * pad, with (w, h) the largest cell after zoom.
    """
    if isinstance(images, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(images)
        if t.dim() == 4:
            if ncols is None:
                raise ValueError("a [N, C, H, W] tensor needs ncols")
            t = t.reshape(-1, ncols, *t.shape[1:])
        if t.dim() != 5:
            raise ValueError(f"expected [rows, cols, C, H, W], got {tuple(t.shape)}")
        rows = [[_to_pil(img) for img in row] for row in t]
    else:
        rows = [[_to_pil(img) for img in row] for row in images]
    if not rows or not any(rows):
        raise ValueError("no images")
    if upscale != 1:
        rows = [[im.resize((im.width * upscale, im.height * upscale), Image.NEAREST) for im in row] for row in rows]
    cell_w = max(im.width for row in rows for im in row)
    cell_h = max(im.height for row in rows for im in row)
    n_cols = max(len(row) for row in rows)
    grid = Image.new("RGB", (n_cols * cell_w + (n_cols + 1) * pad, len(rows) * cell_h + (len(rows) + 1) * pad),
                     background)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (pad + c * (cell_w + pad), pad + r * (cell_h + pad)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save_png(grid, path)
    return path


# ----------------------------------------------------------------------------------------- plot
_PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 10))
    return ticks


def plot_quality_vs_steps(rows: Sequence[dict], path, size=(720, 450), title: str = "FID vs sampling steps") -> Path:
    """PNG line plot of FID against steps, one polyline per model (drawn with PIL).

    rows: dicts with keys steps, fid, model; rows whose fid is None/NaN are skipped.
    x is log-scaled when steps span more than a factor 8 (1, 2, 4 ... 50 would crowd otherwise).
    """
    pts: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        fid = r.get("fid")
        if fid is None or not math.isfinite(float(fid)):
            continue
        pts.setdefault(str(r.get("model", "model")), []).append((float(r["steps"]), float(fid)))
    for v in pts.values():
        v.sort()
    W, H = size
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(15), _font(12)
    left, right, top, bottom = 70, 20, 40, 60
    draw.text((W // 2, 12), title, fill="black", font=font, anchor="mt")

    all_pts = [p for v in pts.values() for p in v]
    if not all_pts:
        draw.text((W // 2, H // 2), "no data", fill="gray", font=font, anchor="mm")
    else:
        xs = sorted({x for x, _ in all_pts})
        log_x = xs[0] > 0 and xs[-1] / xs[0] > 8
        fx = (lambda s: math.log(s)) if log_x else (lambda s: s)
        x0, x1 = fx(xs[0]), fx(xs[-1])
        if x1 == x0:
            x0, x1 = x0 - 1, x1 + 1
        yticks = _nice_ticks(min(y for _, y in all_pts), max(y for _, y in all_pts))
        y0, y1 = yticks[0], yticks[-1]
        pw, ph = W - left - right, H - top - bottom

        def to_px(x, y):
            return (left + (fx(x) - x0) / (x1 - x0) * pw * 0.92 + pw * 0.04,
                    top + ph - (y - y0) / (y1 - y0) * ph)

        for yt in yticks:  # horizontal grid and y labels
            _, py = to_px(xs[0], yt)
            draw.line([(left, py), (left + pw, py)], fill=(230, 230, 230))
            draw.text((left - 6, py), f"{yt:g}", fill="black", font=small, anchor="rm")
        for xt in xs:  # one tick per measured step count
            px, _ = to_px(xt, y0)
            draw.line([(px, top + ph), (px, top + ph + 5)], fill="black")
            draw.text((px, top + ph + 8), f"{xt:g}", fill="black", font=small, anchor="mt")
        draw.rectangle([left, top, left + pw, top + ph], outline="black")
        draw.text((left + pw // 2, H - 18), "sampling steps" + (" (log scale)" if log_x else ""),
                  fill="black", font=small, anchor="mm")
        draw.text((14, top + ph // 2), "FID", fill="black", font=small, anchor="lm")

        for i, (model, v) in enumerate(sorted(pts.items())):
            color = _PALETTE[i % len(_PALETTE)]
            px = [to_px(x, y) for x, y in v]
            if len(px) > 1:
                draw.line(px, fill=color, width=2)
            for cx, cy in px:
                draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
            ly = top + 10 + 18 * i  # legend, top right inside the axes
            draw.line([(left + pw - 130, ly), (left + pw - 110, ly)], fill=color, width=3)
            draw.text((left + pw - 104, ly), model, fill="black", font=small, anchor="lm")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save_png(img, path)
    return path


# ----------------------------------------------------------------------------------------- report
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222; max-width: 1100px;
       margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
h1 { font-size: 1.6rem; border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { border: 1px solid #ddd; padding: .35rem .8rem; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f4f4f4; }
tbody th { text-align: left; font-weight: 600; background: #fafafa; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; }
dt { font-weight: 600; } dd { margin: 0; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .9rem; }
dl dl { margin: 0; }
figure { margin: 1rem 0 1.5rem; }
.grids { display: flex; flex-wrap: wrap; gap: 0 2rem; align-items: flex-start; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; image-rendering: pixelated; }
figcaption { color: #555; font-size: .9rem; margin-top: .3rem; }
"""


def _html_dl(d: dict) -> str:
    items = []
    for k, v in d.items():
        inner = _html_dl(v) if isinstance(v, dict) and v else html.escape(format_value(v))
        items.append(f"<dt>{html.escape(str(k))}</dt><dd>{inner}</dd>")
    return "<dl>" + "".join(items) + "</dl>"


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


def render_markdown(metrics: dict, grids: dict, plot: Optional[str], title: str, out_dir: Path) -> str:
    models = metrics.get("models") or {}
    lines = [f"# {title}", ""]
    if models:
        keys = _metric_keys(models)
        lines += ["## Metrics", "",
                  "| metric | " + " | ".join(_md_cell(m) for m in models) + " |",
                  "|---|" + "---:|" * len(models)]
        for k in keys:
            cells = [_md_cell(format_value(m.get(k))) for m in models.values()]
            lines.append(f"| {_md_cell(METRIC_LABELS.get(k, k))} | " + " | ".join(cells) + " |")
        lines.append("")
    if plot:
        lines += ["## Quality vs steps", "", f"![FID vs steps]({quote(_relative_src(out_dir, plot))})", ""]
    if grids:
        lines += ["## Samples", "", "Rows are prompts, columns are seeds.", ""]
        for caption, name in grids.items():
            lines += [f"![{caption}]({quote(_relative_src(out_dir, name))})", "", f"*{caption}*", ""]
    if metrics.get("protocol"):
        lines += ["## Protocol", ""] + _md_list(metrics["protocol"]) + [""]
    return "\n".join(lines)


def render_html(metrics: dict, grids: dict, plot: Optional[str], title: str, out_dir: Path) -> str:
    e = html.escape
    models = metrics.get("models") or {}
    body = [f"<h1>{e(title)}</h1>"]
    if models:
        keys = _metric_keys(models)
        head = "".join(f"<th>{e(str(m))}</th>" for m in models)
        rows = []
        for k in keys:
            cells = "".join(f'<td class="num">{e(format_value(m.get(k)))}</td>' for m in models.values())
            rows.append(f"<tr><th>{e(METRIC_LABELS.get(k, k))}</th>{cells}</tr>")
        body += ["<h2>Metrics</h2>",
                 f"<table><thead><tr><th>metric</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"]
    if plot:
        src = e(quote(_relative_src(out_dir, plot)))
        body += ["<h2>Quality vs steps</h2>",
                 f'<figure><img src="{src}" alt="FID vs steps"><figcaption>FID against sampling steps'
                 "</figcaption></figure>"]
    if grids:
        figs = []
        for caption, name in grids.items():
            src = e(quote(_relative_src(out_dir, name)))
            figs.append(f'<figure><img src="{src}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>')
        body += ["<h2>Samples</h2>", "<p>Rows are prompts, columns are seeds.</p>",
                 '<div class="grids">' + "".join(figs) + "</div>"]
    if metrics.get("protocol"):
        body += ["<h2>Protocol</h2>", _html_dl(metrics["protocol"])]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{e(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(out_dir, metrics: dict, grids: dict[str, str], plot: Optional[str] = None,
                 title: str = "DDIL evaluation report") -> tuple[Path, Path]:
    """Write report.md and report.html into out_dir; images are referenced by paths relative to it.

    metrics: {"protocol": {...}, "models": {name: {metric: value}}}, any subset of keys; None/NaN -> "—".
    grids: caption -> PNG file name relative to out_dir. plot: optional PNG name relative to out_dir.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    _atomic_write_bytes(md_path, render_markdown(metrics, grids, plot, title, out_dir).encode("utf-8"))
    _atomic_write_bytes(html_path, render_html(metrics, grids, plot, title, out_dir).encode("utf-8"))
    return md_path, html_path
