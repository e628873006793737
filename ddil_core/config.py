"""One typed schema for every stage: YAML recipes, `--set a.b=c` overrides, strict validation.

A recipe is a YAML file whose keys mirror the dataclasses below. Unknown keys are rejected with the nearest
valid key named; invalid values are rejected with a message that says what is wrong. `resolved_dict` gives the
fully-resolved config that every stage writes next to its outputs.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the key or value."""


# ----------------------------------------------------------------------------------------------------------------
# The schema


@dataclass
class ModelConfig:
    teacher: str = "tiny://sd15"  # local diffusers folder, hub id, s3://..., or tiny://sd15 | tiny://sdxl
    family: Literal["auto", "sd15", "sdxl"] = "auto"  # auto: read from the teacher's model_index.json
    resolution: Optional[int] = None  # image side in pixels; None: the teacher's native size
    allow_pickle: bool = False  # refuse .bin/.ckpt weights unless set (then loaded with weights_only)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # teacher weights during training


@dataclass
class DataConfig:
    dataset: str = "demo://digits"  # image folder with captions.jsonl, COCO captions JSON, .tar shards, demo://digits
    images: Optional[str] = None  # image folder of a COCO captions JSON
    bad_sample_policy: Literal["fail", "skip"] = "fail"
    limit: Optional[int] = None  # use only the first N samples
    shard_size: int = 256  # samples per latent shard
    batch_size: int = 16  # VAE encode batch
    num_workers: int = 2  # worker processes reading and decoding images while the encoders run (0: in-process)
    latent_bound_percentile: float = 0.999  # per-channel |x0| percentile stored as the static reflection bound


@dataclass
class PriorsConfig:
    """DDIL state-source probabilities (method.md section 1); they must sum to 1. Baseline = (1, 0, 0)."""

    forward: float = 0.5
    teacher: float = 0.25
    student: float = 0.25


@dataclass
class BufferConfig:
    """Replay buffer of student-backward states (paper v2: 'lightweight replay buffer'); knobs are ours."""

    enabled: bool = True
    capacity: int = 256
    refresh_fraction: float = 0.25  # expected share of each batch's student states rolled out fresh (stochastic rounding)
    eviction: Literal["fifo", "reservoir"] = "fifo"


@dataclass
class ReflectionConfig:
    """Reflected diffusion by thresholding x0 estimates (method.md section 2; ddil_core/math/reflection.py).

    Student rollouts use the reflection the student's saved scheduler applies in plain diffusers (one scalar static
    bound, or dynamic thresholding); a setting it cannot express is refused when distill starts."""

    mode: Literal["off", "static", "dynamic"] = "off"
    percentile: float = 0.995  # dynamic: per-sample quantile p of |x0| (diffusers' dynamic_thresholding_ratio)
    bound: Optional[float] = None  # static: one bound for all channels; None: per-channel bounds of the latent cache
    #                                (student rollouts: the largest of them)
    max_value: Optional[float] = None  # dynamic: cap of s (diffusers' sample_max_value); None: largest cache bound
    apply_to: list[str] = field(default_factory=lambda: ["teacher_targets", "teacher_rollouts", "student_rollouts"])


REFLECTION_TARGETS = ("teacher_targets", "teacher_rollouts", "student_rollouts", "critic")


@dataclass
class DDILConfig:
    priors: PriorsConfig = field(default_factory=PriorsConfig)
    prior_schedule: Literal["constant", "linear"] = "constant"  # linear: from (1,0,0) to priors over warmup_steps
    warmup_steps: int = 0
    teacher_mode: Literal["precomputed", "mixed", "bernoulli"] = "precomputed"
    mixed_teacher_steps: int = 1  # mixed: teacher for the first m student-grid steps, then the student
    bernoulli_teacher_p: float = 0.5  # bernoulli: probability the teacher takes each step
    buffer: BufferConfig = field(default_factory=BufferConfig)
    reflection: ReflectionConfig = field(default_factory=ReflectionConfig)


@dataclass
class PDConfig:
    """Progressive distillation (Salimans and Ho 2022)."""

    teacher_steps: int = 8  # steps of the first teacher; each stage halves until objective.student_steps
    steps_per_stage: Optional[int] = None  # None: training.steps split evenly over the stages
    weighting: Literal["snr_trunc", "snr", "constant"] = "snr_trunc"


@dataclass
class LCMConfig:
    """Latent consistency distillation (Luo et al. 2023).

    w_min, w_max are in the Imagen form (eps_u + w (eps_c - eps_u), the guidance_scale users pass; the student
    embeds w - 1). diffusers' train_lcm_distill_sd_wds.py draws w ~ U[5, 15] in the LCM form (eps_c + w (eps_c -
    eps_u)) despite its help text, which is Imagen U[6, 16]: our defaults, equal to its targets (tests/test_objectives.py).
    """

    num_ddim_timesteps: int = 50
    w_min: float = 6.0
    w_max: float = 16.0
    ema_decay: float = 0.95
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = 0.001
    time_cond_proj_dim: int = 256


# diffusers examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py: its default LoRA targets (attention,
# feed-forward, resnet convolutions, resamplers and the time-embedding projections of every block).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@dataclass
class LoRAConfig:
    """LoRA adapters (peft) on a frozen copy of the teacher instead of training every weight (method/adapters.py)."""

    rank: int = 0  # 0: off, every weight is trained (full fine-tuning)
    alpha: Optional[float] = None  # LoRA scale alpha / rank; None: alpha = rank (scale 1)
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    save_fused: bool = False  # student only: also write DIR/student-fused/, the adapters fused into a full UNet


@dataclass
class DMD2Config:
    """Distribution matching distillation v2 (Yin et al. 2024; code: tianweiy/DMD2). Defaults are the reference's
    unless marked; DMD2's backward simulation is DDIL's student-backward source (ddil.priors.student)."""

    # The generator's grid; None: DMD2's range(999, 0, -(1000 // N)) for N = objective.student_steps ([999, 749,
    # 499, 249] at 4, [999, 499] at 2, [999] at 1). Given timesteps must be a grid LCMScheduler samples for some
    # original_inference_steps, so the saved scheduler reproduces them from num_inference_steps alone.
    timesteps: Optional[list[int]] = None
    real_guidance_scale: float = 1.75  # CFG of the real score in the DM gradient (SD 1.5 recipe; SDXL: 8)
    generator_lr: Optional[float] = None  # None: training.lr (DMD2: the generator's and the fake score's are equal)
    fake_lr: Optional[float] = None  # the fake score's and GAN head's; None: training.lr
    dfake_gen_update_ratio: int = 10  # two time-scale update: fake score steps per generator step (SDXL: 5)
    min_step: int = 20  # DM gradient timesteps t ~ U{min_step..max_step} (0.02 and 0.98 of T)
    max_step: int = 980
    gan: bool = True  # GAN head on the fake score's bottleneck (on in every final DMD2 recipe)
    gan_gen_weight: float = 5e-3  # generator's softplus(-D(fake)) (SDXL recipes; SD 1.5 stage 2: 1e-3)
    gan_disc_weight: float = 1e-2  # discriminator's softplus(D(fake)) + softplus(-D(real))
    regression_weight: float = 0.0  # DMD (v1)'s regression on the teacher's noise-image pairs; 0: off, as in DMD2
    regression_loss: Literal["l2", "huber"] = "l2"  # DMD used LPIPS on images, which needs downloaded weights: ours
    #                                                 is in latent space (huber: pseudo-Huber, c = 1e-3 as LCM)
    fake_lora: LoRAConfig = field(default_factory=LoRAConfig)  # LoRA on the fake score (rank 0: trained fully, as DMD2)


@dataclass
class ObjectiveConfig:
    name: Literal["pd", "lcm", "dmd2"] = "pd"
    student_steps: int = 4
    guidance_scale: float = 3.0  # teacher CFG scale w (Imagen form: eps_u + w (eps_c - eps_u))
    pd: PDConfig = field(default_factory=PDConfig)
    lcm: LCMConfig = field(default_factory=LCMConfig)
    dmd2: DMD2Config = field(default_factory=DMD2Config)


@dataclass
class RolloutsConfig:
    """Teacher-backward states precomputed by the `teacher-rollouts` stage."""

    num_samples: int = 64
    teacher_steps: int = 8  # teacher DDIM steps; a multiple of the student's steps so the grids nest
    guidance_scale: Optional[float] = None  # None: objective.guidance_scale
    shard_size: int = 256
    batch_size: int = 16
    seed: int = 1234


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.999


@dataclass
class TrainingConfig:
    steps: int = 20
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0  # 0 disables
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    max_nonfinite_in_a_row: int = 10
    wall_clock_limit_s: Optional[float] = None  # guard: checkpoint and stop when exceeded
    # --- memory at scale (docs/performance.md, "what fits where"); all off by default: nothing changes
    gradient_checkpointing: bool = False  # recompute activations in backward, trainable UNets only (student, fake score)
    grad_accum_steps: int = 1  # batch_size is the global batch of one update, in grad_accum_steps micro-batches:
    #                            per-device micro-batch = batch_size / (processes x grad_accum_steps)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # LoRA student (rank > 0); saved for load_lora_weights
    fsdp: bool = False  # shard the trainable networks over the processes (FSDP2 fully_shard; training/fsdp.py)
    streaming: bool = False  # read latents, embeddings and rollout states from the shards per batch, not into memory


@dataclass
class EvaluationConfig:
    prompts: Optional[str] = None  # a text file, one prompt per line; None: the dataset's distinct captions
    num_prompts: int = 10
    images_per_prompt: int = 4
    seed: int = 0
    student_steps: list[int] = field(default_factory=list)  # extra step counts; always includes the student's own
    teacher_steps: int = 50
    teacher_guidance_scale: Optional[float] = None  # None: objective.guidance_scale
    extractor: str = "classifier"  # "classifier" (the demo's domain classifier), "inception", or module:callable
    k: int = 5
    batch_size: int = 16  # images generated per batch
    num_reference: Optional[int] = None  # use at most this many reference images; None: all
    fid_cross_check: bool = True  # also record torchmetrics' FID on the same features (fid_torchmetrics)


@dataclass
class GatesConfig:
    fid_factor: Optional[float] = None  # student FID <= teacher FID * factor
    min_coverage: Optional[float] = None
    min_adherence: Optional[float] = None


@dataclass
class RegistryConfig:
    uri: str = "registry"  # local registry folder
    model_name: str = "ddil-student"
    kubeflow_address: Optional[str] = None  # Kubeflow Model Registry server; None: local registry
    kubeflow_port: int = 8080
    gates: GatesConfig = field(default_factory=GatesConfig)


@dataclass
class TelemetryConfig:
    pushgateway: Optional[str] = None  # host:port; None: no push
    run_id: Optional[str] = None  # grouping key; None: derived from the output folder
    push_interval_s: float = 15.0
    metrics_port: Optional[int] = None  # distill rank 0 serves /metrics here when set


@dataclass
class DemoConfig:
    """The digits demo built by `prepare-demo` (demo-facts.md): training budgets in steps, a wall-clock guard each.

    A guard stops a phase early (logged and recorded in summary.json) so a slow machine still finishes; None: off.
    """

    seed: int = 0
    vae_steps: int = 300  # AutoencoderKL, MSE + 0.5 L1 + 1e-4 KL; about 50 s on 2 cores (held-out MSE ~0.001)
    vae_batch_size: int = 64
    vae_lr: float = 2.0e-3
    classifier_steps: int = 600  # the evaluation classifier (about 15 s)
    teacher_steps: int = 1800  # UNet2DConditionModel, Min-SNR weighting, EMA; about 4.5 minutes on 2 cores
    teacher_batch_size: int = 64
    teacher_lr: float = 1.0e-3
    teacher_ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1  # share of captions replaced by the empty prompt (classifier-free guidance)
    guidance_scale: float = 2.0  # teacher CFG scale measured in summary.json (2: 99% accuracy, best FD)
    eval_steps: int = 50  # DDIM steps of the teacher measurement
    eval_few_steps: list[int] = field(default_factory=lambda: [4, 2])  # also measured (cheap): plain DDIM at few steps
    eval_images_per_digit: int = 30
    vae_max_seconds: Optional[float] = None
    teacher_max_seconds: Optional[float] = None
    threads: int = 1  # torch threads of every phase: fixed, so the same code and seed rebuild the same teacher
    #                   bit for bit (one thread is also the fastest on a shared 2-core CPU: demo-facts.md)
    adapt_threads: bool = False  # instead switch between one thread and all cores by measured speed
    #                              (demo/progress.py: ThreadTuner); not bit-reproducible


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ddil: DDILConfig = field(default_factory=DDILConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    rollouts: RolloutsConfig = field(default_factory=RolloutsConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)  # prepare-demo only


# ----------------------------------------------------------------------------------------------------------------
# Building a config from plain data, strictly


def _nearest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads off/no/on/yes as booleans
            value = next((a for a in args if a in (("on", "yes") if value else ("off", "no"))), value)
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an integer literal beyond any float
            raise ConfigError(f"{where}: {value} is not a finite number") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_nearest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> dict:
    """'a.b.c=value' -> {'a': {'b': {'c': value}}}; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({yaml_error_line(exc)})") from None
    node: dict = {}
    cursor = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return node


def yaml_error_line(exc: Exception) -> str:
    """A YAML parse error in one line: where it is and what is wrong (PyYAML's own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(str(getattr(exc, "problem", None) or exc).split())
    context = getattr(exc, "context", None)
    return where + what + (f" ({' '.join(str(context).split())})" if context else "")


def recipe_path(name_or_path: str) -> Path:
    """A recipe is a YAML path, or a name looked up in ./configs and in the project's configs/ folder."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not path.exists():
            raise ConfigError(f"config file not found: {name_or_path}")
        return path
    for root in (Path.cwd() / "configs", Path(__file__).resolve().parent.parent / "configs"):
        candidate = root / f"{name_or_path}.yaml"
        if candidate.exists():
            return candidate
    raise ConfigError(f"no recipe named '{name_or_path}' (looked for configs/{name_or_path}.yaml)")


def load_config(recipe: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a recipe (path or name; None: the defaults), apply `a.b=c` overrides, validate."""
    data: dict = {}
    source = "defaults"
    if recipe:
        path = recipe_path(recipe)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({yaml_error_line(exc)})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a YAML recipe (not valid UTF-8 text)") from None
        except OSError as exc:
            raise ConfigError(f"{path}: unreadable recipe ({exc.strerror or exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides or []:
        data = _merge(data, parse_override(item))
    try:
        config = _build(Config, data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    validate(config, source)
    return config


def config_from_dict(data: dict) -> Config:
    config = _build(Config, data)
    validate(config, "config")
    return config


def validate(config: Config, source: str = "config") -> None:
    from ddil_core.config_ranges import number_problems, relation_problems

    # Every number finite and in its key's range first: the checks below assume sane values (no 0 divisors).
    problems = number_problems(config)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
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
    for where, lora in (("training.lora", t.lora), ("objective.dmd2.fake_lora", o.dmd2.fake_lora)):
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
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def resolved_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(resolved_dict(config), sort_keys=False)
