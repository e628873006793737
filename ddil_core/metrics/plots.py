"""Images of the report (drawn with PIL: matplotlib is not part of the environment): sample grids, with each row
labelled by its prompt, one-row strips of a grid for side-by-side comparisons, and line plots (FID against sampling
steps, the distillation loss against the training step)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def _atomic_save_png(img: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)  # readers never see a half-written file


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # FreeType build: scalable default font
    except (TypeError, OSError):
        return ImageFont.load_default()


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
              upscale: int = 1, row_labels: Optional[Sequence[str]] = None) -> Path:
    """One PNG grid, rows = prompts, columns = seeds.

    images: list of rows of PIL images (or [3, H, W] tensors), or a tensor [rows, cols, C, H, W], or a
    tensor [N, C, H, W] with `ncols`. Float tensors are read as [0, 1]; uint8 as is.
    upscale: integer nearest-neighbour zoom of every cell (8x8 or 16x16 samples are unreadable otherwise).
    row_labels: one text per row (its prompt), written in a margin left of the row.
    Size: cols * w + (cols + 1) * pad by rows * h + (rows + 1) * pad, with (w, h) the largest cell after zoom, plus
    the label margin's width.
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
    labels = [str(label) for label in row_labels] if row_labels is not None else None
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"{len(labels)} row labels for {len(rows)} rows")
    font = _font(max(10, min(16, cell_h // 3)))
    margin = (max(int(math.ceil(font.getlength(label))) for label in labels) + 2 * pad) if labels else 0
    grid = Image.new("RGB", (margin + n_cols * cell_w + (n_cols + 1) * pad,
                             len(rows) * cell_h + (len(rows) + 1) * pad), background)
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        top = pad + r * (cell_h + pad)
        if labels:
            draw.text((pad, top + cell_h // 2), labels[r], fill="black", font=font, anchor="lm")
        for c, im in enumerate(row):
            grid.paste(im, (margin + pad + c * (cell_w + pad), top))
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


def plot_lines(series: dict, path, title: str, x_label: str, y_label: str, size=(720, 450),
               log_x: Optional[bool] = None, x_ticks: Optional[Sequence[float]] = None) -> Path:
    """PNG line plot, one polyline per name of `series` ({name: [(x, y), ...]}; non-finite points skipped).
    log_x None: log scale when x spans more than a factor 8. x_ticks: where to label x (None: about 6 nice ticks)."""
    pts = {str(name): sorted((float(x), float(y)) for x, y in values if y is not None and math.isfinite(float(y)))
           for name, values in series.items()}
    pts = {name: v for name, v in pts.items() if v}
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
        if log_x is None:
            log_x = xs[0] > 0 and xs[-1] / xs[0] > 8
        fx = (lambda v: math.log(v)) if log_x else (lambda v: v)
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
        if x_ticks is None:
            x_ticks = xs if len(xs) <= 8 else [t for t in _nice_ticks(xs[0], xs[-1], 6) if xs[0] <= t <= xs[-1]]
        for xt in x_ticks:
            px, _ = to_px(xt, y0)
            draw.line([(px, top + ph), (px, top + ph + 5)], fill="black")
            draw.text((px, top + ph + 8), f"{xt:g}", fill="black", font=small, anchor="mt")
        draw.rectangle([left, top, left + pw, top + ph], outline="black")
        draw.text((left + pw // 2, H - 18), x_label + (" (log scale)" if log_x else ""), fill="black", font=small,
                  anchor="mm")
        draw.text((14, top + ph // 2), y_label, fill="black", font=small, anchor="lm")
        for i, (name, v) in enumerate(pts.items()):
            color = _PALETTE[i % len(_PALETTE)]
            px = [to_px(x, y) for x, y in v]
            if len(px) > 1:
                draw.line(px, fill=color, width=2)
            if len(px) <= 60:  # markers for measured points, not for a dense curve
                for cx, cy in px:
                    draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
            ly = top + 10 + 18 * i  # legend, top right inside the axes
            draw.line([(left + pw - 130, ly), (left + pw - 110, ly)], fill=color, width=3)
            draw.text((left + pw - 104, ly), name, fill="black", font=small, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save_png(img, path)
    return path


def plot_quality_vs_steps(rows: Sequence[dict], path, size=(720, 450), title: str = "FID vs sampling steps") -> Path:
    """FID against sampling steps, one line per model (rows: dicts with steps, fid, model; None/NaN fid skipped);
    x is log-scaled when steps span more than a factor 8 (1, 2, 4 ... 50 would crowd otherwise)."""
    series: dict = {}
    for r in sorted(rows, key=lambda r: str(r.get("model", "model"))):
        series.setdefault(str(r.get("model", "model")), []).append((r["steps"], r.get("fid")))
    return plot_lines(series, path, title, "sampling steps", "FID", size)


def plot_loss(rows: Sequence[dict], path, title: str = "DDIL distillation loss", size=(720, 450)) -> Path:
    """The training loss against the step (rows as demo/export.py's loss_rows: step, loss, loss_<source>)."""
    series: dict = {"loss (all states)": [(r["step"], r.get("loss")) for r in rows]}
    for key in sorted({k for r in rows for k in r if k.startswith("loss_")}):
        series[key[len("loss_"):] + " states"] = [(r["step"], r.get(key)) for r in rows if key in r]
    return plot_lines(series, path, title, "training step", "loss", size, log_x=False)
