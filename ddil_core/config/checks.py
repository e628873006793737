"""Every check of a config, each rule once: the range of every numeric key, the rules between keys, and the
checks that need the teacher's noise schedule.

1. `number_problems`: a float must be finite (NaN or infinity in a recipe or `--set x=.nan` is an error, never "no
   guidance" or a student of non-finite weights), and every int or float, or each entry of a list of them, must lie
   in the range `RANGES` lists for its key. tests/config/test_config_ranges.py checks that every numeric field of
   `Config` has an entry, so a new key cannot be added without one. The CLI's flags take their bounds from the same
   `Range`s.
2. `relation_problems`: rules between keys (priors summing to 1, the progressive teacher's steps a power-of-2
   multiple of the student's, ...), checked once every number is in range (they assume no zero divisors).
3. `schedule_problems`: what a config can only be compared with once the teacher is loaded: its number of training
   timesteps T.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from ddil_core.config.schema import REFLECTION_TARGETS, ConfigError


@dataclass(frozen=True)
class Range:
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # low itself is excluded
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        low, high = _fmt(self.low), _fmt(self.high)
        if self.high is None:
            if self.low == 0 and self.low_open:
                return "positive"
            return f"{'more than' if self.low_open else 'at least'} {low}"
        if self.low is None:
            return f"{'less than' if self.high_open else 'at most'} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


COUNT = Range(1)  # steps, sizes, batch sizes: at least one
NATURAL = Range(0)  # zero allowed
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0.0)
PROBABILITY = Range(0.0, 1.0)
FRACTION = Range(0.0, 1.0, low_open=True)  # (0, 1]
DECAY = Range(0.0, 1.0, high_open=True)  # [0, 1): an EMA decay or an Adam beta
SEED = Range(0, 2**63 - 2**32)  # torch.Generator.manual_seed takes 64-bit seeds; rollout i uses seed + i
GUIDANCE = Range(0.0)  # CFG scale w, Imagen form eps_u + w (eps_c - eps_u): 1 = no guidance, 0 = unconditional
PORT = Range(1, 65535)
LEARNING_RATE = Range(0.0, 1.0, low_open=True)  # AdamW moves each weight by about lr a step; beyond 1 is no training
INT64 = 2**63

RANGES: dict[str, Range] = {
    "model.resolution": Range(8, 4096),  # pixels; the teacher's VAE factor is checked once it is loaded
    "data.limit": COUNT,
    "data.shard_size": COUNT,
    "data.batch_size": COUNT,
    "data.num_workers": Range(0, 256),  # processes
    "data.latent_bound_percentile": FRACTION,
    "ddil.priors.forward": PROBABILITY,
    "ddil.priors.teacher": PROBABILITY,
    "ddil.priors.student": PROBABILITY,
    "ddil.warmup_steps": NATURAL,
    "ddil.mixed_teacher_steps": NATURAL,
    "ddil.bernoulli_teacher_p": PROBABILITY,
    "ddil.student_min_steps": NATURAL,
    "ddil.buffer.capacity": COUNT,
    "ddil.buffer.refresh_fraction": FRACTION,
    "ddil.reflection.percentile": FRACTION,
    "ddil.reflection.bound": POSITIVE,
    "ddil.reflection.max_value": Range(1.0),  # s is floored at 1 (diffusers' _threshold_sample)
    "objective.student_steps": COUNT,
    "objective.guidance_scale": GUIDANCE,
    "objective.pd.teacher_steps": COUNT,
    "objective.pd.steps_per_stage": COUNT,
    "objective.lcm.num_ddim_timesteps": COUNT,
    "objective.lcm.w_min": GUIDANCE,
    "objective.lcm.w_max": GUIDANCE,
    "objective.lcm.ema_decay": DECAY,
    "objective.lcm.huber_c": POSITIVE,
    "objective.lcm.time_cond_proj_dim": COUNT,
    "objective.tdd.num_ddim_timesteps": COUNT,
    "objective.tdd.guidance_scale": GUIDANCE,
    "objective.tdd.min_inference_steps": COUNT,
    "objective.tdd.max_inference_steps": COUNT,
    "objective.tdd.target_window": COUNT,
    "objective.tdd.s_ratio": PROBABILITY,
    "objective.tdd.caption_dropout": PROBABILITY,
    "objective.tdd.huber_c": POSITIVE,
    "objective.tdd.ema_decay": DECAY,
    "objective.tdd.sampling_guidance": GUIDANCE,
    "objective.tdd.eta": PROBABILITY,  # TCDScheduler.step asserts 0 <= eta <= 1
    "objective.dmd2.timesteps": NATURAL,  # each entry; below the teacher's T (schedule_problems)
    "objective.dmd2.real_guidance_scale": GUIDANCE,
    "objective.dmd2.generator_lr": LEARNING_RATE,
    "objective.dmd2.fake_lr": LEARNING_RATE,
    "objective.dmd2.dfake_gen_update_ratio": COUNT,
    "objective.dmd2.min_step": NATURAL,
    "objective.dmd2.max_step": NATURAL,
    "objective.dmd2.gan_gen_weight": NON_NEGATIVE,
    "objective.dmd2.gan_disc_weight": NON_NEGATIVE,
    "objective.dmd2.regression_weight": NON_NEGATIVE,
    "objective.dmd2.fake_lora.rank": NATURAL,  # 0: the fake score trained fully
    "objective.dmd2.fake_lora.alpha": POSITIVE,
    "rollouts.num_samples": COUNT,
    "rollouts.teacher_steps": COUNT,
    "rollouts.guidance_scale": GUIDANCE,
    "rollouts.shard_size": COUNT,
    "rollouts.batch_size": COUNT,
    "rollouts.seed": SEED,
    "training.steps": COUNT,
    "training.batch_size": COUNT,
    "training.lr": LEARNING_RATE,
    "training.weight_decay": NON_NEGATIVE,
    "training.adam_beta1": DECAY,
    "training.adam_beta2": DECAY,
    "training.grad_clip": NON_NEGATIVE,  # 0 disables
    "training.ema.decay": DECAY,
    "training.checkpoint_every": COUNT,
    "training.keep_checkpoints": COUNT,
    "training.log_every": COUNT,
    "training.seed": SEED,
    "training.max_nonfinite_in_a_row": COUNT,
    "training.wall_clock_limit_s": POSITIVE,
    "training.grad_accum_steps": COUNT,
    "training.eval_every": NATURAL,  # 0: no in-training evaluation
    "training.eval_num_noises": Range(2, 4096),  # KID needs two samples a side
    "training.alarm.factor": Range(1.0),  # 1: any worsening from the best
    "training.alarm.margin": NON_NEGATIVE,
    "training.alarm.patience": COUNT,
    "training.lora.rank": NATURAL,  # 0: full fine-tuning
    "training.lora.alpha": POSITIVE,
    "evaluation.num_prompts": COUNT,
    "evaluation.images_per_prompt": COUNT,
    "evaluation.seed": SEED,
    "evaluation.student_steps": COUNT,  # each entry
    "evaluation.teacher_steps": COUNT,
    "evaluation.teacher_guidance_scale": GUIDANCE,
    "evaluation.k": COUNT,
    "evaluation.batch_size": COUNT,
    "evaluation.num_reference": Range(2),
    "diagnose.num_noises": Range(2, 1_000_000),  # an interval needs two noises
    "diagnose.seed": SEED,
    "diagnose.batch_size": COUNT,
    "diagnose.bootstrap": Range(100, 100_000),
    "registry.kubeflow_port": PORT,
    "registry.gates.fid_factor": POSITIVE,
    "registry.gates.min_coverage": PROBABILITY,
    "registry.gates.min_adherence": PROBABILITY,
    "telemetry.push_interval_s": NON_NEGATIVE,  # 0: push at every update
    "telemetry.metrics_port": Range(0, 65535),  # 0: any free port
    "demo.seed": SEED,
    "demo.vae_steps": COUNT,
    "demo.vae_batch_size": COUNT,
    "demo.vae_lr": LEARNING_RATE,
    "demo.classifier_steps": COUNT,
    "demo.teacher_steps": COUNT,
    "demo.teacher_batch_size": COUNT,
    "demo.teacher_lr": LEARNING_RATE,
    "demo.teacher_ema_decay": DECAY,
    "demo.min_snr_gamma": POSITIVE,
    "demo.caption_dropout": Range(0.0, 1.0, high_open=True),
    "demo.guidance_scale": Range(1.0),
    "demo.eval_steps": COUNT,
    "demo.eval_few_steps": COUNT,  # each entry
    "demo.eval_images_per_digit": COUNT,
    "demo.vae_max_seconds": POSITIVE,
    "demo.teacher_max_seconds": POSITIVE,
    "demo.threads": COUNT,
    "demo.workers": COUNT,
}


def _is_numeric(tp: Any) -> bool:
    if typing.get_origin(tp) is typing.Union:
        return any(_is_numeric(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return _is_numeric(typing.get_args(tp)[0])
    return tp in (int, float)


def numeric_fields(cls: type, prefix: str = "") -> Iterator[str]:
    """Dotted keys of every int or float field (plain, Optional or list) of a config dataclass, recursively."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, key + ".")
        elif _is_numeric(tp):
            yield key


def _value(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def number_problems(config: Any) -> list[str]:
    """Every numeric value that is not finite or outside its key's range, one message each (naming key and value)."""
    problems = []
    for key in numeric_fields(type(config)):
        value = _value(config, key)
        values = value if isinstance(value, list) else [value]
        where = key if not isinstance(value, list) else f"{key} = {value}: entry"
        rng = RANGES.get(key)
        for v in values:
            if v is None or isinstance(v, bool):
                continue
            if isinstance(v, int) and not -INT64 <= v < INT64:  # what torch and the file formats hold
                problems.append(f"{where} {v} does not fit in 64 bits" if isinstance(value, list) else
                                f"{key} = {v} does not fit in 64 bits")
                break
            if isinstance(v, float) and not math.isfinite(v):
                problems.append(f"{where} {v} is not a finite number" if isinstance(value, list) else
                                f"{key} = {v} is not a finite number")
                break
            if rng is not None and not rng.contains(v):
                problems.append(f"{where} {v} must be {rng.describe()}" if isinstance(value, list) else
                                f"{key} = {v} must be {rng.describe()}")
                break
    return problems


def validate(config: Any, source: str = "config") -> None:
    """Raise ConfigError naming `source` and every problem of config_problems."""
    problems = config_problems(config)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def config_problems(config: Any) -> list[str]:
    """What is wrong with a config, one line per problem (empty: nothing). Numbers first: the rules between keys
    assume every value is finite and in its range."""
    return number_problems(config) or relation_problems(config)


def relation_problems(config: Any) -> list[str]:
    """Rules between keys of one config (no teacher or data needed); every number is already in its range."""
    problems = []
    p = config.ddil.priors
    total = p.forward + p.teacher + p.student
    if abs(total - 1.0) > 1e-6:
        problems.append(
            f"ddil.priors must sum to 1, got forward {p.forward} + teacher {p.teacher} + student {p.student} = {total:g}"
        )
    o = config.objective
    if o.name == "pd":
        t = o.pd.teacher_steps
        if o.student_steps >= t:
            problems.append(
                f"objective.student_steps = {o.student_steps} must be fewer than objective.pd.teacher_steps = {t}"
            )
        elif t % o.student_steps or (t // o.student_steps) & (t // o.student_steps - 1):
            problems.append(
                f"objective.pd.teacher_steps = {t} must be the student's steps ({o.student_steps}) times a power of 2"
            )
    r = config.rollouts
    if o.name == "pd" and r.teacher_steps % o.student_steps and p.teacher > 0 and config.ddil.teacher_mode == "precomputed":
        problems.append(
            f"rollouts.teacher_steps = {r.teacher_steps} must be a multiple of objective.student_steps = "
            f"{o.student_steps} so the teacher's grid passes through the student's timesteps"
        )
    if o.lcm.w_min > o.lcm.w_max:
        problems.append(f"objective.lcm.w_min = {o.lcm.w_min} must not exceed objective.lcm.w_max = {o.lcm.w_max}")
    if o.name == "lcm" and o.student_steps > o.lcm.num_ddim_timesteps:
        problems.append(f"objective.student_steps = {o.student_steps} must be at most objective.lcm.num_ddim_timesteps "
                        f"= {o.lcm.num_ddim_timesteps} (the LCM student samples on its solver grid)")
    td = o.tdd
    if td.min_inference_steps > td.max_inference_steps:
        problems.append(f"objective.tdd.min_inference_steps = {td.min_inference_steps} must not exceed "
                        f"objective.tdd.max_inference_steps = {td.max_inference_steps}")
    if o.name == "tdd" and td.max_inference_steps > td.num_ddim_timesteps:
        problems.append(f"objective.tdd.max_inference_steps = {td.max_inference_steps} must be at most "
                        f"objective.tdd.num_ddim_timesteps = {td.num_ddim_timesteps} (schedules on the solver grid)")
    if o.name == "tdd" and o.student_steps > td.num_ddim_timesteps:
        problems.append(f"objective.student_steps = {o.student_steps} must be at most objective.tdd.num_ddim_timesteps "
                        f"= {td.num_ddim_timesteps} (the TDD student samples on its solver grid)")
    refl = config.ddil.reflection
    if o.name == "tdd" and refl.mode != "off" and "student_rollouts" in refl.apply_to:
        problems.append(f"ddil.reflection.apply_to contains student_rollouts with ddil.reflection.mode = {refl.mode}, "
                        "but a TDD student ships with diffusers' TCDScheduler, whose step never thresholds x0: the "
                        "student's rollouts must sample as the shipped student does (reflect teacher_targets or "
                        "teacher_rollouts only)")
    d = o.dmd2
    if d.min_step > d.max_step:
        problems.append(f"objective.dmd2.min_step = {d.min_step} must not exceed objective.dmd2.max_step = "
                        f"{d.max_step}")
    ts = list(d.timesteps or [])
    if o.name == "dmd2" and d.timesteps is not None and len(ts) != o.student_steps:
        problems.append(
            f"objective.dmd2.timesteps has {len(ts)} entries but objective.student_steps = {o.student_steps}"
        )
    if o.name == "dmd2" and any(a <= b for a, b in zip(ts, ts[1:])):
        problems.append(f"objective.dmd2.timesteps = {ts} must be strictly decreasing (the generator steps from "
                        "high noise to low)")
    for target in config.ddil.reflection.apply_to:
        if target not in REFLECTION_TARGETS:
            problems.append(
                f"ddil.reflection.apply_to: unknown target '{target}'{_nearest(target, list(REFLECTION_TARGETS))}"
            )
    if p.student > 0 and config.ddil.student_min_steps >= o.student_steps:
        problems.append(f"ddil.student_min_steps = {config.ddil.student_min_steps} must be below "
                        f"objective.student_steps = {o.student_steps} (a student of N steps has own states after "
                        "0 .. N - 1 of them; with ddil.priors.student > 0)")
    if config.ddil.rollout_policy == "ema" and not config.training.ema.enabled:
        problems.append("ddil.rollout_policy = ema needs training.ema.enabled = true (no EMA to roll out with)")
    t = config.training
    if t.batch_size % t.grad_accum_steps:
        problems.append(f"training.batch_size = {t.batch_size} must be divisible by training.grad_accum_steps = "
                        f"{t.grad_accum_steps} (batch_size is the global batch of one update)")
    for where, lora in (("training.lora", t.lora), ("objective.dmd2.fake_lora", o.dmd2.fake_lora)):
        if lora.rank > 0 and not lora.target_modules:
            problems.append(f"{where}.target_modules is empty: a LoRA needs at least one module to adapt")
    dtype, mp = config.model.dtype, t.mixed_precision
    wanted = {"float16": "fp16", "bfloat16": "bf16"}.get(dtype)
    if wanted is not None and mp != wanted:
        problems.append(f"model.dtype = {dtype} needs training.mixed_precision = {wanted} (the frozen {dtype} teacher "
                        f"takes float32 inputs only under autocast), got {mp}")
    demo = config.demo
    if demo.adapt_threads and demo.workers > 1:
        problems.append(f"demo.adapt_threads = true needs demo.workers = 1, got {demo.workers} (the tuner changes "
                        "the intra-op thread count; workers already keep every core busy on one thread each)")
    return problems


def _nearest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def schedule_problems(config: Any, num_train_timesteps: int, stage: str) -> list[str]:
    """What must fit the teacher's T training timesteps, for the keys `stage` uses; one message each."""
    T = int(num_train_timesteps)
    o, problems = config.objective, []

    def at_most(key: str, value: int, limit: int = T) -> None:
        if value > limit:
            problems.append(f"{key} = {value} must be at most the teacher's {T} training timesteps")

    if stage in ("teacher-rollouts", "distill"):
        at_most("rollouts.teacher_steps", config.rollouts.teacher_steps)
    if stage == "distill":
        at_most("objective.student_steps", o.student_steps)
        if o.name == "pd":
            at_most("objective.pd.teacher_steps", o.pd.teacher_steps)
        if o.name == "lcm":
            at_most("objective.lcm.num_ddim_timesteps", o.lcm.num_ddim_timesteps)
        if o.name == "tdd":
            at_most("objective.tdd.num_ddim_timesteps", o.tdd.num_ddim_timesteps)
        if o.name == "dmd2":
            for key in ("min_step", "max_step"):
                if getattr(o.dmd2, key) >= T:
                    problems.append(f"objective.dmd2.{key} = {getattr(o.dmd2, key)} must be below the teacher's {T} "
                                    f"training timesteps")
            outside = [t for t in (o.dmd2.timesteps or []) if not 0 <= t < T]
            if outside:
                problems.append(f"objective.dmd2.timesteps = {o.dmd2.timesteps}: {outside} not in [0, {T}) (the "
                                "teacher's training timesteps)")
    if stage == "evaluate":
        at_most("evaluation.teacher_steps", config.evaluation.teacher_steps)
        for n in config.evaluation.student_steps:
            if n > T:
                problems.append(f"evaluation.student_steps = {config.evaluation.student_steps}: entry {n} must be at "
                                f"most the teacher's {T} training timesteps")
                break
    return problems
