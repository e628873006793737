"""The distill stage's half of watching a run (training/watch.py): the fixed probe it measures with.

M = training.eval_num_noises noises from training.seed, the latent cache's prompts one per distinct caption in turn,
the teacher's guided DDIM over each interval of the student's grid (unreflected, as diagnose's reference), and the
evaluation classifier (evaluation.extractor, found beside a local teacher as evaluate finds it) for the features of
the decoded samples and the adherence to the prompted digit; without one, KID is taken on the latents flattened.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ddil_core.config import Config, ConfigError
from ddil_core.data.digits import prompt_class
from ddil_core.method.rollouts import teacher_interval_step
from ddil_core.metrics.extractors import find_classifier_near, load_extractor
from ddil_core.models.denoiser import Denoiser
from ddil_core.models.latents import decode_latents
from ddil_core.models.teacher import rollout_guidance
from ddil_core.training.watch import Probe, Watch

log = logging.getLogger(__name__)


def build_watch(config: Config, objective, trainer, teacher, cache, ctx, device) -> Optional[Watch]:
    t = config.training
    if not t.eval_every:
        return None
    if trainer.fsdp:
        raise ConfigError("training.eval_every with training.fsdp: the watch measures an unsharded student; set "
                          "training.eval_every = 0 under FSDP")
    m = t.eval_num_noises
    captions = list(cache.captions)
    firsts = list(dict.fromkeys(captions))
    rows = [captions.index(c) for c in firsts] or [0]
    rows = [rows[i % len(rows)] for i in range(m)]
    index = torch.as_tensor(rows)
    cond = {k: v[index].to(device, torch.float32) for k, v in cache.cond.items()}
    noise = torch.randn((m, *cache.latents.shape[1:]), generator=torch.Generator().manual_seed(t.seed + 7919))
    teacher_step = teacher_interval_step(Denoiser(teacher.unet, teacher.train_schedule), config.rollouts.teacher_steps,
                                         ctx.uncond, rollout_guidance(config))
    probe = Probe(noise=noise.to(device), cond=cond, teacher_step=teacher_step, seed=t.seed)
    spec = config.evaluation.extractor
    if (spec == "classifier" and find_classifier_near(config.model.teacher)) or spec.startswith("classifier:"):
        extractor = load_extractor(spec, device, teacher=config.model.teacher)

        def images(x):
            return decode_latents(teacher.pipe.vae, x)

        probe.features = lambda x: extractor.features(images(x))
        wanted = [prompt_class(captions[r]) for r in rows]
        if extractor.can_classify and all(w is not None for w in wanted):
            probe.classify, probe.wanted = (lambda x: extractor.classify(images(x))), wanted
    log.info("distill: watching the student every %d updates on %d noises (alarm: %s on %s)", t.eval_every, m,
             t.alarm.action, t.alarm.metric)
    return Watch(config, objective, trainer.ema, probe)
