"""What every benchmark shares: a quiet, pinned-thread environment, the machine record, interleaved timing, the
tiny data set (latent cache + teacher rollouts), statistics, tables, and writing results as JSON.

Rules every benchmark follows (docs/performance.md): compare A and B only inside one run, with their repetitions
interleaved (A B A B ..., order rotated per round) so load from other processes on a shared machine hits both
alike; pin torch's thread count and record it; never compare absolute times across runs.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS_JSON = ROOT / "docs" / "performance.json"
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from anywhere imports ddil_core and benchmarks.common
    sys.path.insert(0, str(ROOT))


def setup(threads: int = 1) -> int:
    """Offline, quiet, `threads` torch threads (set before torch spins up its pool). Returns the thread count."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    for noisy in ("diffusers", "transformers", "accelerate", "ddil_core", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:  # diffusers prints some notices through its own logger objects
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except Exception:  # pragma: no cover - diffusers always there in this project
        pass
    return torch.get_num_threads()


def _lscpu() -> dict:
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def machine() -> dict:
    """What the numbers were measured on: CPU model and cores, torch threads and version, GPU, date, git commit."""
    import torch

    cpu = _lscpu()
    record = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_model": cpu.get("Model name") or platform.processor() or "unknown",
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import accelerate
        import diffusers

        record["diffusers"], record["accelerate"] = diffusers.__version__, accelerate.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "ddil_core"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        record["git_commit"] = head + ("+uncommitted ddil_core changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        record["git_commit"] = None
    return record


def command_line() -> str:
    return " ".join(["python", os.path.relpath(sys.argv[0], ROOT) if sys.argv and sys.argv[0] else "?", *sys.argv[1:]])


# ------------------------------------------------------------------------------------------------ timing


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                sync: Optional[Callable[[], None]] = None, equalize: bool = False) -> dict[str, list[float]]:
    """Seconds of one call of each case, repeated `repeats` times with the cases interleaved and their order rotated
    each round (A B C, B C A, C A B, ...) so slow drift of the machine's load hits every case alike. `warmup` untimed
    rounds first. equalize: each timed unit of a short case repeats its call until it lasts about as long as the
    longest case (counts fixed from the warm-up), so a burst of load from another process is as likely to land in
    either side of a ratio; the time reported is still per call."""
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    inner = {n: 1 for n in names}
    sync = sync or (lambda: None)
    for r in range(max(warmup, 1 if equalize else 0) + repeats):
        timed = r >= max(warmup, 1 if equalize else 0)
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync()
            t0 = time.perf_counter()
            for _ in range(inner[name] if timed else 1):
                cases[name]()
            sync()
            elapsed = time.perf_counter() - t0
            if timed:
                times[name].append(elapsed / inner[name])
            elif equalize:
                times[name] = [elapsed]  # the last warm-up call sets the repeat counts
        if equalize and r == max(warmup, 1) - 1:
            longest = max(t[0] for t in times.values())
            inner = {n: max(1, round(longest / max(times[n][0], 1e-9))) for n in names}
            times = {n: [] for n in names}
    return times


def rotated(items: Sequence, round_index: int) -> list:
    k = round_index % max(1, len(items))
    return list(items[k:]) + list(items[:k])


def median(values: Iterable[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values: Sequence[float]) -> dict:
    """Median, min, max and count of a sample (what the tables print)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b in (None, 0) else a / b


# ------------------------------------------------------------------------------------------------ data


def tiny_config(*overrides: str):
    """The tiny recipe (configs/tiny.yaml), as tests/conftest.py's tiny_config("sd15", ...)."""
    from ddil_core.config import load_config

    return load_config("tiny", ["model.teacher=tiny://sd15", *overrides])


DATA_OVERRIDES = [
    # teacher rollouts on the 4-step trailing grid [999, 749, 499, 249]: it contains the grids of PD 2-step
    # ([999, 499]), LCM 2-step ([999, 499]) and DMD2 4-step ([999, 749, 499, 249]), so one rollout set serves all.
    "rollouts.teacher_steps=4",
]


def data_overrides(limit: int = 64, rollouts: int = 16) -> list[str]:
    """The overrides of build_data's caches: a distill run over them passes them too (distill refuses a latent cache
    or rollouts made with other data.* or rollouts.* than its config says)."""
    return [*DATA_OVERRIDES, f"data.limit={limit}", f"rollouts.num_samples={rollouts}"]


def build_data(root: Path, limit: int = 64, rollouts: int = 16) -> tuple[Path, Path]:
    """cache-latents + teacher-rollouts of the tiny recipe into `root` (reused when already there)."""
    from ddil_core.stages.cache_latents import cache_latents
    from ddil_core.stages.teacher_rollouts import teacher_rollouts

    root = Path(root)
    latents, rolls = root / "latents", root / "rollouts"
    config = tiny_config(*data_overrides(limit, rollouts))
    if not (latents / "manifest.json").exists():
        cache_latents(config, latents)
    if not (rolls / "manifest.json").exists():
        teacher_rollouts(config, latents, rolls)
    return latents, rolls


def read_log(run: Path) -> list[dict]:
    path = Path(run) / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ------------------------------------------------------------------------------------------------ output


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table (what the scripts print and docs/performance.md quotes)."""
    cells = [[fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def write_results(name: str, result: dict, out: Optional[str], update_docs: bool = False) -> Path:
    """Write `result` (with the machine record and the command) to `out` (default benchmarks/results/NAME.json);
    with update_docs also merge it into docs/performance.json under `name`."""
    result = {"benchmark": name, "command": command_line(), "machine": machine(), **result}
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if update_docs:
        merged = json.loads(DOCS_JSON.read_text()) if DOCS_JSON.exists() else {}
        merged[name] = result
        DOCS_JSON.parent.mkdir(parents=True, exist_ok=True)
        DOCS_JSON.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {path}" + (f" and {DOCS_JSON}" if update_docs else ""))
    return path


def add_common_args(parser, default_threads: int = 1) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1-2 repetitions (smoke test; timings meaningless)")
    parser.add_argument("--threads", type=int, default=default_threads, help="torch threads (recorded in the JSON)")
    parser.add_argument("--out", help="JSON output (default benchmarks/results/NAME.json)")
    parser.add_argument("--update-docs", action="store_true", help="also merge the result into docs/performance.json")
