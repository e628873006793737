"""The rules between a config's values (priors summing to 1, student steps fewer than the teacher's, ...), checked
after every number is finite and in its key's range (config_ranges.py)."""
from __future__ import annotations

import difflib

from ddil_core.config import REFLECTION_TARGETS, Config, ConfigError


def _nearest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def validate(config: Config, source: str = "config") -> None:
    """Raise ConfigError naming `source` and every problem of config_problems."""
    problems = config_problems(config)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def config_problems(config: Config) -> list[str]:
    """What is wrong with a config, one line per problem (empty: nothing)."""
    from ddil_core.config_ranges import number_problems, relation_problems

    # Every number finite and in its key's range first: the checks below assume sane values (no 0 divisors).
    problems = number_problems(config)
    if problems:
        return problems
    problems = relation_problems(config)
    p = config.ddil.priors
    for name in ("forward", "teacher", "student"):
        if getattr(p, name) < 0:
            problems.append(f"ddil.priors.{name} = {getattr(p, name)} is negative")
    total = p.forward + p.teacher + p.student
    if abs(total - 1.0) > 1e-6:
        problems.append(
            f"ddil.priors must sum to 1, got forward {p.forward} + teacher {p.teacher} + student {p.student} = {total:g}"
        )
    o = config.objective
    if o.student_steps < 1:
        problems.append(f"objective.student_steps = {o.student_steps} must be at least 1")
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
    if o.name == "dmd2" and o.dmd2.timesteps is not None and len(o.dmd2.timesteps) != o.student_steps:
        problems.append(
            f"objective.dmd2.timesteps has {len(o.dmd2.timesteps)} entries but objective.student_steps = {o.student_steps}"
        )
    r = config.rollouts
    if o.name == "pd" and r.teacher_steps % o.student_steps and p.teacher > 0 and config.ddil.teacher_mode == "precomputed":
        problems.append(
            f"rollouts.teacher_steps = {r.teacher_steps} must be a multiple of objective.student_steps = "
            f"{o.student_steps} so the teacher's grid passes through the student's timesteps"
        )
    b = config.ddil.buffer
    if b.capacity < 1:
        problems.append(f"ddil.buffer.capacity = {b.capacity} must be at least 1")
    if not 0 < b.refresh_fraction <= 1:
        problems.append(f"ddil.buffer.refresh_fraction = {b.refresh_fraction} must be in (0, 1]")
    refl = config.ddil.reflection
    for target in refl.apply_to:
        if target not in REFLECTION_TARGETS:
            problems.append(
                f"ddil.reflection.apply_to: unknown target '{target}'{_nearest(target, list(REFLECTION_TARGETS))}"
            )
    if not 0 < refl.percentile <= 1:
        problems.append(f"ddil.reflection.percentile = {refl.percentile} must be in (0, 1]")
    if refl.bound is not None and refl.bound <= 0:
        problems.append(f"ddil.reflection.bound = {refl.bound} must be positive")
    if refl.max_value is not None and refl.max_value < 1:
        problems.append(f"ddil.reflection.max_value = {refl.max_value} must be at least 1 (s is floored at 1)")
    t = config.training
    for name in ("steps", "batch_size", "checkpoint_every", "log_every", "max_nonfinite_in_a_row"):
        if getattr(t, name) < 1:
            problems.append(f"training.{name} = {getattr(t, name)} must be at least 1")
    if t.lr <= 0:
        problems.append(f"training.lr = {t.lr} must be positive")
    if t.grad_accum_steps >= 1 and t.batch_size % t.grad_accum_steps:
        problems.append(f"training.batch_size = {t.batch_size} must be divisible by training.grad_accum_steps = "
                        f"{t.grad_accum_steps} (batch_size is the global batch of one update)")
    for where, lora in (("training.lora", t.lora), ("objective.dmd2.fake_lora", config.objective.dmd2.fake_lora)):
        if lora.rank > 0 and not lora.target_modules:
            problems.append(f"{where}.target_modules is empty: a LoRA needs at least one module to adapt")
    if not 0 <= config.ddil.bernoulli_teacher_p <= 1:
        problems.append(f"ddil.bernoulli_teacher_p = {config.ddil.bernoulli_teacher_p} must be in [0, 1]")
    if config.data.shard_size < 1:
        problems.append(f"data.shard_size = {config.data.shard_size} must be at least 1")
    if config.data.num_workers < 0:
        problems.append(f"data.num_workers = {config.data.num_workers} must be 0 (read in-process) or more")
    d = config.demo
    for name in ("vae_steps", "vae_batch_size", "classifier_steps", "teacher_steps", "teacher_batch_size",
                 "eval_steps", "eval_images_per_digit", "threads"):
        if getattr(d, name) < 1:
            problems.append(f"demo.{name} = {getattr(d, name)} must be at least 1")
    for name in ("vae_lr", "teacher_lr", "min_snr_gamma"):
        if getattr(d, name) <= 0:
            problems.append(f"demo.{name} = {getattr(d, name)} must be positive")
    if not 0 <= d.teacher_ema_decay < 1:
        problems.append(f"demo.teacher_ema_decay = {d.teacher_ema_decay} must be in [0, 1)")
    if not 0 <= d.caption_dropout < 1:
        problems.append(f"demo.caption_dropout = {d.caption_dropout} must be in [0, 1)")
    if d.guidance_scale < 1:
        problems.append(f"demo.guidance_scale = {d.guidance_scale} must be at least 1 (1 = no guidance)")
    if any(n < 1 for n in d.eval_few_steps):
        problems.append(f"demo.eval_few_steps = {d.eval_few_steps}: every entry must be at least 1")
    for name in ("vae_max_seconds", "teacher_max_seconds"):
        if getattr(d, name) is not None and getattr(d, name) <= 0:
            problems.append(f"demo.{name} = {getattr(d, name)} must be positive (or null: no guard)")
    ev = config.evaluation
    for name in ("num_prompts", "images_per_prompt", "teacher_steps", "k", "batch_size"):
        if getattr(ev, name) < 1:
            problems.append(f"evaluation.{name} = {getattr(ev, name)} must be at least 1")
    if any(n < 1 for n in ev.student_steps):
        problems.append(f"evaluation.student_steps = {ev.student_steps}: every entry must be at least 1")
    if ev.num_reference is not None and ev.num_reference < 2:
        problems.append(f"evaluation.num_reference = {ev.num_reference} must be at least 2 (or null: all)")
    return problems
