"""What the `ddil` command shows besides its own lines: libraries' notices that are not the user's business are
dropped, and the CPU thread count is chosen (and said) once.

Dropped, by message, at the logger that emits it (nothing else of these libraries is silenced):

- transformers 5: "`CLIPImageProcessor` requires torchvision (not installed); falling back to ..." (twice at every
  import; torchvision cannot be installed beside torch 2.13 here (pyproject.toml: the gpu-metrics extra), and no stage uses an image
  processor);
- diffusers: "You have disabled the safety checker ..." (students and the demo teacher are built without the safety
  checker on purpose: digits need none, and a student keeps its teacher's components);
- the per-file progress bars of diffusers, transformers and huggingface_hub when loading and saving pipelines
  ("Loading pipeline components...", "Loading weights", "Writing model shards"): ddil's own progress is
  progress.py's.

Threads: torch's default is every core, and on a CPU shared with other work its OpenMP threads wait for each other
at every parallel region (docs/demo.md: a distill update took 16-22 s on two threads and 0.35 s on one on a busy
2-core machine, 0.24 s against 0.35 s when idle). So without $OMP_NUM_THREADS the command uses half the cores it may
run on (at least one): one on a 2-core machine, which also leaves a core to the rest of the machine. Set
OMP_NUM_THREADS to choose (tests and CI set 1).
"""
from __future__ import annotations

import logging
import os

#: (logger name, text): records of that logger containing the text are dropped.
NOISE = (
    ("transformers.utils.import_utils", "requires torchvision"),
    ("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion", "disabled the safety checker"),
    ("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl", "disabled the safety checker"),
)


class _DropText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_libraries(with_diffusers: bool = True) -> None:
    """Drop the notices above. `with_diffusers` also turns off diffusers' loading bar, which imports diffusers
    (about 4 s on the project's machines: stages that load a pipeline pay it anyway, `ddil register` does not)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # huggingface_hub's and transformers' bars
    for name, text in NOISE:
        logger = logging.getLogger(name)  # the same object the library's get_logger(name) returns later
        if not any(isinstance(f, _DropText) and f.text == text for f in logger.filters):
            logger.addFilter(_DropText(text))
    if with_diffusers:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads() -> str:
    """Set torch's intra-op thread count (see the module docstring) and return the line that says what it chose."""
    import torch

    if os.environ.get("OMP_NUM_THREADS", "").strip():
        n = torch.get_num_threads()  # torch has read OMP_NUM_THREADS
        return f"torch: {n} CPU thread{'' if n == 1 else 's'} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    cores = usable_cores()
    n = max(1, cores // 2)
    torch.set_num_threads(n)
    return (f"torch: {n} CPU thread{'' if n == 1 else 's'} of {cores} cores (half, for a CPU shared with other work; "
            "set OMP_NUM_THREADS to choose)")
