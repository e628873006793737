"""Small files for DVC, made from stage outputs (ddil_core itself never imports dvc):

    python -m ddil_core.demo.export demo-summary demo/summary.json metrics/demo.json
    python -m ddil_core.demo.export train-loss runs/demo/distill/train_log.jsonl metrics/train_loss.json
    python -m ddil_core.demo.export loss-png runs/demo/distill/train_log.jsonl metrics/train_loss.png
    python -m ddil_core.demo.export copy runs/demo/evaluate/metrics_flat.json metrics/student.json

train-loss: distill's JSONL training log -> a JSON list that `dvc plots` draws: one row per logged step with step,
stage, student_steps, loss (the objective's main loss term over the whole batch: its "all" entry, else the
count-weighted mean over state sources) and loss_<source> for each DDIL state source present in that interval.
loss-png: the same curve drawn as a PNG (metrics/plots.py): `dvc plots show` embeds image plots as they are, so the
page shows the loss offline, where its vega charts (loaded from a CDN) stay blank; evaluate's FID-vs-steps PNG is
copied beside it for the same reason.
train-eval: a watched run's in-training measures (training.eval_every) as rows of step, drift, kid, shift_factor,
adherence for `dvc plots`; watch-summary: their best and last values, the metrics a sweep ranks by.
copy: a file copied atomically.
demo-summary: the headline scalars of prepare-demo's summary.json (teacher accuracy and Fréchet distance at 50 and
at few steps, the floor, VAE and classifier quality, seconds), flat.

DVC takes metrics and plots files only outside a stage's output folders, and they must be tracked by git (not
under the git-ignored demo/ and runs/) for `dvc metrics diff` and `dvc exp show` to compare runs: hence metrics/.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

from ddil_core.data.shards import write_json_atomic


def loss_rows(log_path: Path) -> list[dict]:
    rows = []
    for line in Path(log_path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "loss" not in record:  # an in-training evaluation's line (eval_rows)
            continue
        row = {"step": record["step"], "stage": record.get("stage", 0), "student_steps": record.get("student_steps")}
        losses = record.get("loss") or {}
        by_source = next(iter(losses.values()), {}) if losses else {}
        counts = record.get("source_count") or {}
        per_source = {src: v for src, v in by_source.items() if src != "all"}
        if "all" in by_source:
            row["loss"] = by_source["all"]
        elif per_source:
            weights = {src: counts.get(src) or 1 for src in per_source}
            row["loss"] = sum(v * weights[src] for src, v in per_source.items()) / sum(weights.values())
        for src, value in per_source.items():
            row[f"loss_{src}"] = value
        rows.append(row)
    return rows


def eval_rows(log_path: Path) -> list[dict]:
    """The in-training measures of a watched run (training/watch.py): one row per measure with step and each
    finite number (drift, kid, shift_factor, adherence); `dvc plots` draws them against the step."""
    rows = []
    for line in Path(log_path).read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if isinstance(record.get("eval"), dict):
            row = {"step": record["step"]}
            row.update({k: v for k, v in record["eval"].items() if isinstance(v, (int, float))
                        and not isinstance(v, bool) and k in WATCHED and math.isfinite(v)})
            rows.append(row)
    return rows


def watch_summary(rows: list[dict]) -> dict:
    """The scalars a sweep ranks by (`dvc exp show`): the best (lowest) drift and KID of the run and their steps,
    and the last of each; empty for an unwatched run (training.eval_every = 0)."""
    out = {}
    for key in ("drift", "kid"):
        scored = [r for r in rows if key in r]
        if scored:
            best = min(scored, key=lambda r: r[key])
            out.update({f"best_{key}": best[key], f"best_{key}_step": best["step"], f"last_{key}": scored[-1][key]})
    return out


def demo_summary(summary: dict) -> dict:
    teacher = summary["teacher"]
    out = {"teacher_steps": teacher["steps"], "teacher_guidance_scale": teacher["guidance_scale"],
           "teacher_accuracy": teacher["accuracy"], "teacher_fid": teacher["fid"]}
    for steps, m in summary.get("teacher_few_steps", {}).items():
        out[f"teacher_accuracy_{steps}_steps"] = m["accuracy"]
        out[f"teacher_fid_{steps}_steps"] = m["fid"]
    out.update({"fid_floor_train_vs_heldout": summary["reference_fid_train_vs_heldout"],
                "classifier_heldout_accuracy": summary["classifier"]["heldout_accuracy"],
                "vae_heldout_mse": summary["vae"]["heldout_mse"], "seconds": summary["timings_s"]["total"]})
    return out


def copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


WATCHED = ("drift", "kid", "shift_factor", "adherence")
COMMANDS = ("train-loss", "loss-png", "copy", "demo-summary", "train-eval", "watch-summary")
USAGE = ("usage: python -m ddil_core.demo.export {train-loss TRAIN_LOG.jsonl | loss-png TRAIN_LOG.jsonl | "
         "train-eval TRAIN_LOG.jsonl | watch-summary TRAIN_LOG.jsonl | demo-summary SUMMARY.json | copy SRC} DST")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2
    what, src, dst = args[0], Path(args[1]), Path(args[2])
    if not src.is_file():
        print(f"ddil_core.demo.export: error: {src}: not found", file=sys.stderr)
        return 2
    if what == "copy":
        copy_atomic(src, dst)
        return 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    if what == "train-loss":
        write_json_atomic(dst, loss_rows(src))
    elif what == "train-eval":
        write_json_atomic(dst, eval_rows(src))
    elif what == "watch-summary":
        write_json_atomic(dst, watch_summary(eval_rows(src)))
    elif what == "loss-png":
        from ddil_core.metrics.plots import plot_loss

        plot_loss(loss_rows(src), dst)
    else:
        write_json_atomic(dst, demo_summary(json.loads(src.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
