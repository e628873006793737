"""The `ddil` command line: one subcommand per stage.

Every stage takes `--config RECIPE` (a YAML path or a name in configs/) and `--set a.b=c` overrides; bad input
exits non-zero with one line naming the file, key or value at fault.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import sys
from typing import Optional, Sequence

from ddil_core.config.checks import COUNT, NATURAL, NON_NEGATIVE, PORT, RANGES, Range

EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what Kubernetes expects of a terminated container
EXIT_INTERRUPTED = 130  # 128 + SIGINT (Ctrl-C): a stage stopped by a signal exits 128 + that signal
LIGHT_COMMANDS = ("register",)
TEACHER_HELP = "teacher: diffusers folder, hub id, s3:// or tiny://sd15|sdxl (default: model.teacher)"  # no torch or diffusers: no thread count to choose, no diffusers to quiet


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line (it prints the usage first, several lines, by default); exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(text) -> str:
    """An error message in one line, with no secret in it (ddil_core/config/redaction.py)."""
    from ddil_core.config.redaction import redact_string

    return redact_string(" ".join(str(text).split()))


def _number(kind, allowed: Range, note: str = "", multiple_of: int = 1):
    """An argparse type: `kind` (int or float), finite (so --guidance nan is an error), in the config key's range."""
    def parse(raw: str):
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{raw!r} is not a finite number")
        if not allowed.contains(value) or (multiple_of > 1 and value % multiple_of):  # 4.5 % 1 is not 0
            raise argparse.ArgumentTypeError(f"{raw} must be {allowed.describe()}{note}")
        return value

    parse.__name__ = kind.__name__
    return parse


# The flags' bounds are the config keys' (ddil_core/config/checks.py): a flag accepts what its key accepts.
_steps = _number(int, RANGES["objective.student_steps"])
_natural = _number(int, NATURAL)
_seed = _number(int, RANGES["evaluation.seed"])
_guidance = _number(float, RANGES["objective.guidance_scale"], " (1: no guidance)")


def _config(args, **from_flags):
    from ddil_core.config import load_config

    overrides = list(args.set or [])
    for key, value in from_flags.items():
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(args.config, overrides)


def _q(value: Optional[str]) -> Optional[str]:
    """Quote a CLI-provided string so the YAML override keeps it a string."""
    return None if value is None else "'" + value.replace("'", "''") + "'"


def cmd_cache_latents(args):
    from ddil_core.stages.cache_latents import cache_latents

    config = _config(args, **{"model.teacher": _q(args.teacher), "data.dataset": _q(args.dataset)})
    manifest = cache_latents(config, args.out, restart=args.restart)
    print(f"cached {manifest['count']} latents in {len(manifest['shards'])} shards -> {args.out}"
          + (f" ({manifest['skipped']} bad samples skipped)" if manifest["skipped"] else ""))


def cmd_teacher_rollouts(args):
    from ddil_core.config import ConfigError
    from ddil_core.stages.teacher_rollouts import teacher_rollouts

    if args.shard >= args.num_shards:
        raise ConfigError(f"--shard {args.shard} must be below --num-shards {args.num_shards} (shards 0 .. "
                          f"{args.num_shards - 1})")
    config = _config(args, **{"model.teacher": _q(args.teacher)})
    manifest = teacher_rollouts(config, args.latents, args.out, args.shard, args.num_shards, restart=args.restart)
    print(f"wrote {manifest['count']} teacher rollouts (shard {args.shard} of {args.num_shards}) -> {args.out}")


def cmd_distill(args):
    from ddil_core.stages.distill import distill

    config = _config(args, **{"model.teacher": _q(args.teacher)})
    student = distill(config, args.latents, args.rollouts or [], args.out, restart=args.restart)
    print(f"student -> {student}")


def cmd_prepare_demo(args):
    from pathlib import Path

    from ddil_core.stages.outputs import check_out_path, check_rerun, missing_folders, remove_if_empty
    from ddil_core.stages.prepare_demo import DEMO_ENTRIES, SUMMARY, prepare_demo

    config = _config(args)
    out = Path(args.out)
    check_out_path(out, "folder")
    products = DEMO_ENTRIES - {SUMMARY, "resolved_config.yaml", ".gitignore"}
    if out.is_dir() and any((out / name).exists() for name in products):  # DVC removes them before a rerun
        check_rerun(out, config, "prepare-demo", args.restart)  # the whole folder is rebuilt when this passes
    created = missing_folders(out.parent)
    try:
        summary = prepare_demo(config, args.out)
    except BaseException:
        remove_if_empty(created)  # prepare-demo removes its staging folder; these are the folders made for it
        raise
    teacher = summary["teacher"]
    print(f"demo teacher, dataset and classifier -> {args.out}: teacher {100 * teacher['accuracy']:.1f}% prompted-"
          f"digit accuracy, FD {teacher['fid']:.1f} at {teacher['steps']} DDIM steps (floor "
          f"{summary['reference_fid_train_vs_heldout']:.1f}), {summary['timings_s']['total'] / 60:.1f} min; "
          f"details in {args.out}/summary.json")


def cmd_evaluate(args):
    from ddil_core.stages.evaluate import evaluate

    config = _config(args, **{"model.teacher": _q(args.teacher)})
    metrics = evaluate(config, args.student, config.model.teacher, args.out, baseline=args.baseline,
                       prompts=args.prompts, reference=args.reference, restart=args.restart,
                       covariate_shift=args.covariate_shift)
    print(f"metrics -> {args.out}/metrics.json; report -> {args.out}/report.html")
    _print_metric_line(args.out)
    return metrics


def _print_metric_line(out) -> None:
    """The student's scalar metrics as one `ddil-metric` line (telemetry/metric_line.py), for Katib."""
    import json
    from pathlib import Path

    from ddil_core.telemetry.metric_line import metric_line

    flat = Path(out) / "metrics_flat.json"
    if flat.is_file():
        values = json.loads(flat.read_text())
        print(metric_line(values))


def cmd_diagnose(args):
    from ddil_core.stages.diagnose import diagnose

    config = _config(args, **{"model.teacher": _q(args.teacher)})
    summary = diagnose(config, args.student, config.model.teacher, args.out, prompts=args.prompts,
                       restart=args.restart, reference=args.reference)
    head = summary["headline"]
    fmt = {k: "n/a" if v is None else f"{v:.3g}" for k, v in head.items()}
    print(f"covariate shift: R = {fmt['shift_factor_mean']} (mean after the first step), C = {fmt['compounding']}, "
          f"final drift {fmt['drift_final']} -> {args.out}/diagnose.json")
    return summary


def cmd_register(args):
    from ddil_core.stages.register import register

    entry = register(_config(args), args.student, args.metrics, args.registry)
    print(f"registered {entry['name']} version {entry['version']}")


def cmd_sample(args):
    from pathlib import Path

    from ddil_core.data.shards import disk_full_is_clear
    from ddil_core.stages.outputs import check_out_path, missing_folders, probe_writable, remove_if_empty
    from ddil_core.config.limits import check_text
    from ddil_core.models.sampling import default_steps
    from ddil_core.models.student_record import check_sampling_steps, validate_student_folder
    from ddil_core.stages.sample import sample

    # Before the model is loaded: the image path (and that it can be written), the student's record, the step
    # count its scheduler can run.
    check_text(args.prompt, "--prompt")
    check_text(args.negative_prompt or "", "--negative-prompt")
    check_out_path(Path(args.out), "file", [args.model])
    probe_writable(Path(args.out))
    if Path(args.model).is_dir():
        info = validate_student_folder(args.model, "model")
        check_sampling_steps(args.model, "model", [args.steps or default_steps(info)])
    created = missing_folders(Path(args.out).parent)
    try:
        with disk_full_is_clear(Path(args.out)):
            out = sample(args.model, args.prompt, args.steps, args.seed, args.out, args.guidance, args.scheduler,
                         args.allow_pickle, width=args.width, height=args.height,
                         negative_prompt=args.negative_prompt, eta=args.eta)
    except BaseException:
        remove_if_empty(created)  # nothing of a failed run stays, not even the folders made for the image
        raise
    print(f"image -> {out}")


def cmd_serve(args):
    from ddil_core.serving.predictor import serve  # needs the `serve` extra (kserve)

    serve(args.model, name=args.name, http_port=args.http_port, max_batch_size=args.max_batch_size,
          batch_wait_ms=args.batch_wait_ms, max_steps=args.max_steps, max_size=args.max_size, device=args.device,
          dtype=args.dtype, registry=args.registry, kubeflow_registry=args.kubeflow_registry, host=args.host,
          max_request_bytes=args.max_request_bytes)


_PORT = _number(int, PORT)
_POSITIVE = _number(int, COUNT)
_MILLISECONDS = _number(float, NON_NEGATIVE)
_SIDE = _number(int, Range(8), ", a multiple of 8", multiple_of=8)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a student over KServe's v1 and v2 protocols and OpenAI's images API",
                       description="serve a student with KServe's ModelServer: POST /v1/models/NAME:predict, "
                                   "/v2/models/NAME/infer and /openai/v1/images/generations answer PNG images "
                                   "(base64); readiness at /v1/models/NAME and /v2/models/NAME/ready (503 until "
                                   "the model is loaded)")
    p.add_argument("--model", required=True,
                   help="the student: a pipeline folder, s3://bucket/path, or registry://NAME/VERSION "
                        "(VERSION a number, vN or latest)")
    p.add_argument("--name", default=None,
                   help="model name in the endpoint paths (default: the registry model name, else ddil-student)")
    p.add_argument("--host", default="0.0.0.0",
                   help="address to listen on (default: 0.0.0.0, every interface, as a pod needs; 127.0.0.1: "
                        "this machine only)")
    p.add_argument("--http-port", type=_PORT, default=8080, help="HTTP port (default: 8080, KServe's)")
    p.add_argument("--max-batch-size", type=_POSITIVE, default=8,
                   help="most images per request and per generated batch; concurrent requests with the same "
                        "steps, guidance, size, negative prompt and eta are batched together up to it (default: 8)")
    p.add_argument("--batch-wait-ms", type=_MILLISECONDS, default=0.0,
                   help="how long a batch that is not full waits for more requests (default: 0, no wait)")
    p.add_argument("--max-steps", type=_POSITIVE, default=50,
                   help="largest steps a request may ask for (default: 50, at least the recommended steps)")
    p.add_argument("--max-size", type=_SIDE, default=None,
                   help="largest image width and height in pixels, a multiple of 8 (default: twice the native size)")
    p.add_argument("--max-request-bytes", type=_POSITIVE, default=1 << 20,
                   help="largest request body in bytes; a larger one gets 413 (default: 1048576)")
    p.add_argument("--device", default="auto",
                   help="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="cast the pipeline to this dtype (default: as saved)")
    p.add_argument("--registry", default=None,
                   help="local registry folder for registry:// models (default: registry.uri of the defaults)")
    p.add_argument("--kubeflow-registry", default=None, metavar="HOST[:PORT]",
                   help="resolve registry:// models in this Kubeflow Model Registry instead (port default 8080)")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddil", description="DDIL diffusion distillation stages")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def stage(name, func, help_text, writes_folder=True):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", default=None, help="recipe: a YAML path or a name in configs/ (default: defaults)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
        if writes_folder:
            p.add_argument("--restart", action="store_true",
                           help="--out holds an output of another config: discard it and start over (without this "
                                "flag such a rerun is refused, naming the keys that differ)")
        p.set_defaults(func=func)
        return p

    p = stage("cache-latents", cmd_cache_latents, "encode a dataset with the teacher's VAE and text encoder")
    p.add_argument("--teacher", help=TEACHER_HELP)
    p.add_argument("--dataset", help="image folder with captions.jsonl, COCO JSON, .tar shards, demo://digits or "
                                     "demo://mnist (default: data.dataset)")
    p.add_argument("--out", required=True, help="the latent cache folder to write")

    p = stage("teacher-rollouts", cmd_teacher_rollouts, "record the teacher's reverse-process states")
    p.add_argument("--teacher", help=TEACHER_HELP)
    p.add_argument("--latents", required=True, help="output folder of cache-latents")
    p.add_argument("--out", required=True, help="the rollouts folder to write (one per shard)")
    p.add_argument("--shard", type=_natural, default=0,
                   help="which share of the rollouts this job makes: 0 .. --num-shards - 1 (default: 0)")
    p.add_argument("--num-shards", type=_steps, default=1,
                   help="how many jobs share the rollouts (default: 1, all of them here)")

    p = stage("distill", cmd_distill, "train the few-step student with DDIL (resumes an existing --out)")
    p.add_argument("--teacher", help=TEACHER_HELP)
    p.add_argument("--latents", required=True, help="output folder of cache-latents")
    p.add_argument("--rollouts", action="append",
                   help="teacher-rollouts output folder(s), one per shard (repeatable; needed when "
                        "ddil.priors.teacher > 0 with precomputed rollouts)")
    p.add_argument("--out", required=True,
                   help="the run folder: student/, checkpoints/, buffer/, train_log.jsonl (an existing run resumes)")

    p = stage("prepare-demo", cmd_prepare_demo,
              "make the digits demo: dataset, a trained tiny teacher pipeline and an evaluation classifier")
    p.add_argument("--out", required=True, help="the demo folder to write: dataset/, dataset-eval/, teacher/, "
                                                "classifier/, summary.json")

    p = stage("evaluate", cmd_evaluate, "compare the student with its teacher (and a baseline) and write a report")
    p.add_argument("--student", required=True, help="the student folder distill wrote (DIR/student)")
    p.add_argument("--teacher", help=TEACHER_HELP)
    p.add_argument("--baseline", help="a baseline student folder to compare against")
    p.add_argument("--prompts", help="a text file, one prompt per line (default: evaluation.prompts, else the "
                                     "reference's distinct captions)")
    p.add_argument("--reference", help="reference images (a dataset URI) for FID/density/coverage (default: the "
                                       "held-out split of data.dataset)")
    p.add_argument("--out", required=True, help="the evaluation folder: metrics.json, report.html, sample grids")
    p.add_argument("--covariate-shift", help="a `ddil diagnose` folder of this student: its curve, not measured again")

    p = stage("diagnose", cmd_diagnose, "measure the student's covariate shift against its teacher (error on its "
                                        "own states vs the teacher's, drift, hand-over)")
    p.add_argument("--student", required=True, help="the student folder distill wrote (DIR/student)")
    p.add_argument("--teacher", help=TEACHER_HELP)
    p.add_argument("--prompts", help="a text file, one prompt per line (default: as evaluate's, with --reference)")
    p.add_argument("--reference", help="reference images whose distinct captions are the prompts (as evaluate's)")
    p.add_argument("--out", required=True, help="the diagnosis folder: diagnose.json, covariate_shift.png")

    p = stage("register", cmd_register, "register the student when it passes the evaluation gates",
              writes_folder=False)
    p.add_argument("--student", required=True, help="the student folder that was evaluated")
    p.add_argument("--metrics", required=True, help="metrics.json written by evaluate")
    p.add_argument("--registry", help="local registry folder (default: registry.uri)")

    p = sub.add_parser("sample", help="generate one image", description="generate one image with our sampler")
    p.add_argument("--model", required=True, help="a pipeline folder (teacher or student), hub id or tiny://")
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--steps", type=_steps, default=None, help="default: the student's recommended steps, else 50")
    p.add_argument("--seed", type=_seed, default=0, help="the initial noise's seed (default: 0)")
    p.add_argument("--guidance", type=_guidance, default=None, help="default: the student's, else 7.5")
    p.add_argument("--width", type=_SIDE, default=None, help="image width in pixels (default: the native size)")
    p.add_argument("--height", type=_SIDE, default=None, help="image height in pixels (default: the native size)")
    p.add_argument("--negative-prompt", default=None,
                   help="what to guide away from (classifier-free guidance only; default: the empty prompt)")
    p.add_argument("--eta", type=_number(float, RANGES["objective.tdd.eta"]), default=None,
                   help="the scheduler's eta, for schedulers that take one (DDIM, TCD); default: the student's "
                        "ddil_student.json eta, else 0")
    p.add_argument("--scheduler", choices=["auto", "student", "ddim"], default="auto",
                   help="auto (default): a student's own saved scheduler (the sampler it was trained with), a "
                        "teacher's DDIM; student: the folder's own scheduler; ddim: DDIM on the folder's config")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load .bin/.ckpt (pickle) weights, with torch's weights_only (default: safetensors only)")
    p.add_argument("--out", required=True, help="the PNG file to write")
    p.set_defaults(func=cmd_sample)
    _add_serve(sub)
    return parser


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's allocators (CPU: RuntimeError "can't allocate memory"; CUDA: torch.OutOfMemoryError) and MemoryError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc))


def os_error_line(exc: OSError) -> str:
    """'PATH: what the OS said' (both paths of a rename), in one line."""
    if exc.args and isinstance(exc.args[0], list) and exc.args[0]:  # shutil.Error: [(src, dst, why), ...]
        first = exc.args[0][0]
        return one_line(f"{first[1] if len(first) == 3 else first}: {first[2] if len(first) == 3 else exc}"
                        + (f" (and {len(exc.args[0]) - 1} more files)" if len(exc.args[0]) > 1 else ""))
    paths = [str(p) for p in (exc.filename, getattr(exc, "filename2", None)) if p]
    what = exc.strerror or one_line(exc)
    return f"{' -> '.join(paths)}: {what}" if paths else what


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argument error (2, one line): a code to return, as for any error
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ddil_core.config.redaction import redact_log_record

    for handler in logging.getLogger().handlers:  # a log line carries no secret
        if redact_log_record not in handler.filters:
            handler.addFilter(redact_log_record)
    for noisy in ("diffusers", "transformers", "accelerate", "urllib3", "botocore", "s3fs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from ddil_core.console import choose_threads, quiet_libraries
    from ddil_core.progress import stderr_is_tty

    light = args.command in LIGHT_COMMANDS
    quiet_libraries(with_diffusers=not light)
    if not light and args.command != "prepare-demo":  # prepare-demo runs demo.threads and says so itself
        logging.getLogger("ddil_core").info("%s", choose_threads())
    with contextlib.ExitStack() as stack:
        if stderr_is_tty():  # log lines go above the progress bars instead of through them
            from tqdm.contrib.logging import logging_redirect_tqdm

            stack.enter_context(logging_redirect_tqdm())
        return _run(args)


def _run(args) -> int:
    from ddil_core.data.shards import is_disk_full
    from ddil_core.errors import BAD_INPUT_ERRORS
    from ddil_core.registry import GateError
    from ddil_core.training.loop import NonFiniteLoss, Preempted

    def preempt(signum, frame):  # anywhere outside a loop that checkpoints: stop cleanly (staging removed)
        raise Preempted(f"stopped by signal {signum}", signum=signum)

    # SIGTERM and SIGINT alike: one exception, exit 128 + the signal (143, 130). Put back on return: main() called
    # in-process leaves no trace
    previous = {sig: signal.signal(sig, preempt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        args.func(args)
    except Preempted as exc:
        print(f"ddil {args.command}: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except BAD_INPUT_ERRORS as exc:
        print(f"ddil {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except GateError as exc:
        print(f"ddil {args.command}: {one_line(exc)}", file=sys.stderr)
        return EXIT_GATE_FAILED
    except NonFiniteLoss as exc:  # training diverged (or no update was applied): nothing published, exit 1
        print(f"ddil {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # the machine refused: a read-only or full disk, a path that cannot be made, ...
        print(f"ddil {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        if is_disk_full(exc):  # a full disk reported by a writer that raises no OSError (safetensors, torch)
            print(f"ddil {args.command}: error: {one_line(exc)}: no space left on device", file=sys.stderr)
        elif is_out_of_memory(exc):  # the config asks for more memory than the machine has
            print(f"ddil {args.command}: error: out of memory ({one_line(exc)[:240]}); lower the batch sizes "
                  "(data, rollouts, training, evaluation), ddil.buffer.capacity or model.resolution", file=sys.stderr)
        else:
            raise
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # raised by a library's own SIGINT handler
        print(f"ddil {args.command}: interrupted by signal {int(signal.SIGINT)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
