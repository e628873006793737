"""The DDIL state mixture (DDIL paper, arXiv 2410.11971; docs/method.md section 1).

Each training sample's state x_t comes from one of three sources, drawn per sample with the priors:
  forward  - a real latent x0 noised to a student grid timestep (keeps the data marginal, diversity),
  teacher  - the teacher's reverse process from pure noise, stopped at a student grid timestep (precomputed),
  student  - the student's own sampler run for j < N of its steps without gradient (corrects covariate shift),
             drawn through the replay buffer when it is on.
Every state is then labelled by the teacher inside the objective. The baseline is this code with priors (1, 0, 0).
A student-backward state depends only on noise, the prompt and the student: never on the batch's real images.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ddil_core.config.schema import DDILConfig
from ddil_core.math.schedule import NoiseSchedule
from ddil_core.method.batch import FORWARD, STUDENT, TEACHER, StateBatch, TeacherPairs, TrainingData
from ddil_core.method.buffer import ReplayBuffer
from ddil_core.method.grid import StudentGrid
from ddil_core.method.rollouts import student_rollout
from ddil_core.method.streams import RandomStreams
from ddil_core.models.conditioning import index_cond

def scheduled_priors(config: DDILConfig, step: int) -> torch.Tensor:
    """[forward, teacher, student] probabilities at a training step: constant, or linear from forward-only."""
    target = torch.tensor([config.priors.forward, config.priors.teacher, config.priors.student], dtype=torch.float64)
    if config.prior_schedule == "linear" and config.warmup_steps > 0:
        frac = min(1.0, step / config.warmup_steps)
        return (1 - frac) * torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) + frac * target
    return target


def draw_sources(priors: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample source ids drawn independently with the given probabilities."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    edges = torch.cumsum(priors, 0)[:-1]
    return torch.bucketize(u, edges, right=True)


class DDILMixture:
    def __init__(self, config: DDILConfig, data: TrainingData, schedule: NoiseSchedule, grid: StudentGrid,
                 student_step: Callable, buffer: Optional[ReplayBuffer] = None,
                 device: torch.device | str = "cpu", shared_int: Callable[[int], int] = lambda v: v,
                 forward_timesteps: Optional[torch.Tensor] = None, teacher_step: Optional[Callable] = None,
                 pure_noise_first_step: bool = False, teacher_pairs: bool = False):
        """`student_step(x, k, cond, generator)` is one no-grad step k of the current student on its grid;
        `teacher_step(x, grid, k, cond)` takes the teacher over interval k of the current grid (its own finer DDIM
        steps; only the online teacher modes need it). `shared_int` makes a value agree across ranks (rank 0's wins) so every
        rank rolls out for the same number of steps. `forward_timesteps`: where forward-diffused states are drawn
        (default: the student grid; LCM draws over its whole solver grid). `pure_noise_first_step`: a forward state at
        the grid's first timestep is pure noise, what the student's sampler starts from (DMD2's generator: tianweiy/DMD2
        main/sd_unified_model.py feeds pure noise at its conditioning timestep), not a noised image. `teacher_pairs`:
        every batch also carries as many TeacherPairs drawn from the precomputed rollouts (DMD's regression loss)."""
        self.config, self.data, self.schedule, self.grid = config, data, schedule, grid
        self.student_step, self.buffer, self.device, self.shared_int = student_step, buffer, device, shared_int
        self.teacher_step = teacher_step
        self.forward_timesteps = forward_timesteps
        self.pure_noise_first_step = pure_noise_first_step
        self.teacher_pairs = teacher_pairs
        if teacher_pairs and (data.rollout_states is None or data.rollout_x0 is None):
            raise ValueError("a regression loss on teacher pairs needs teacher rollouts (run teacher-rollouts, "
                             "pass --rollouts)")
        if config.teacher_mode != "precomputed" and config.priors.teacher > 0 and teacher_step is None:
            raise ValueError(f"ddil.teacher_mode = {config.teacher_mode} needs the teacher's interval step")
        if config.teacher_mode == "precomputed" and config.priors.teacher > 0 and data.rollout_states is None:
            raise ValueError("ddil.priors.teacher > 0 needs teacher rollouts (run teacher-rollouts, pass --rollouts)")
        self.rollout_pos = None
        if data.rollout_states is not None and (config.teacher_mode == "precomputed" or teacher_pairs):
            self.rollout_pos = grid.position_in(data.rollout_timesteps)

    def set_grid(self, grid: StudentGrid) -> None:
        """A new student grid (progressive distillation halves it): buffered states of the old grid are dropped."""
        self.grid = grid
        if self.rollout_pos is not None:
            self.rollout_pos = grid.position_in(self.data.rollout_timesteps)
        if self.buffer is not None:
            self.buffer.clear()

    def sample(self, step: int, batch_size: int, generator, shared_int: Optional[Callable[[int], int]] = None
               ) -> StateBatch:
        """A global batch of states. `generator`: the run's RandomStreams, or one torch.Generator for every draw;
        `shared_int`: how this call agrees a value across ranks (default: the constructor's)."""
        streams = RandomStreams.of(generator)
        share = shared_int or self.shared_int
        g, dev, n_grid = streams.rollout, self.device, self.grid.num_steps
        grid_t = self.grid.timesteps
        forward_t = grid_t if self.forward_timesteps is None else self.forward_timesteps
        idx = torch.randint(self.data.latents.shape[0], (batch_size,), generator=streams.data)
        source = draw_sources(scheduled_priors(self.config, step), batch_size, streams.source)
        k = torch.randint(len(forward_t), (batch_size,), generator=streams.data)
        noise = torch.randn(batch_size, *self.data.latents.shape[1:], generator=streams.data)
        x0_real = self.data.latents[idx].float()
        cond = {key: v.float() for key, v in index_cond(self.data.cond, idx).items()}  # caches hold fp16
        cond_real = {key: v.clone() for key, v in cond.items()}

        # forward: q(x_t | x0) at the drawn timestep
        t = forward_t[k]
        if self.config.control == "timestep_matched":
            # the control: every sample a forward state, those of the teacher and student sources at a student grid
            # timestep drawn as those sources draw theirs (uniform over the grid), so the DDIL arm's timestep
            # distribution is matched and only the states' origin differs
            other = source != FORWARD
            t[other] = grid_t[torch.randint(n_grid, (batch_size,), generator=g)[other]]
            source = torch.zeros_like(source)
        x_t = self.schedule.add_noise(x0_real, noise, t)
        if self.pure_noise_first_step:
            first = t == grid_t[0]
            x_t[first] = noise[first]

        # teacher backward: the teacher's reverse process stopped at a student grid timestep
        is_teacher = source == TEACHER
        # a switched-off source draws nothing: rollouts loaded only for the regression pairs leave the stream alone
        if self.rollout_pos is not None and self.config.teacher_mode == "precomputed" and self.config.priors.teacher > 0:
            r = torch.randint(self.data.rollout_states.shape[0], (batch_size,), generator=g)
            k_t = torch.randint(n_grid, (batch_size,), generator=g)
            if is_teacher.any():
                rows = r[is_teacher]
                x_t[is_teacher] = self.data.rollout_states[rows, self.rollout_pos[k_t[is_teacher]]].float()
                t[is_teacher] = grid_t[k_t[is_teacher]]
                ref = self.data.rollout_ref[rows]
                for key in cond:
                    cond[key][is_teacher] = self.data.cond[key][ref].to(cond[key].dtype)
        elif self.config.teacher_mode != "precomputed" and self.config.priors.teacher > 0:  # online rollouts
            j_t = share(int(torch.randint(n_grid, (1,), generator=g)))
            teacher_takes = self._teacher_plan(j_t, g)
            if is_teacher.any():
                x_t[is_teacher] = self._mixed_rollout(j_t, teacher_takes, idx[is_teacher], g)
                t[is_teacher] = grid_t[j_t]

        # student backward: the student's own rollout for j < N steps (j >= ddil.student_min_steps), shared by the
        # batch (and all ranks)
        j = share(int(torch.randint(min(self.config.student_min_steps, n_grid - 1), n_grid, (1,),
                                              generator=g)))
        is_student = source == STUDENT
        n_student = int(is_student.sum())
        fresh, induced = 0, 0
        if n_student:
            states, ks, refs, fresh = self._student_states(step, j, idx[is_student], n_student, g)
            x_t[is_student], t[is_student] = states, grid_t[ks]
            induced = int((ks > 0).sum())
            for key in cond:
                cond[key][is_student] = self.data.cond[key][refs].to(cond[key].dtype)
        pairs = self._teacher_pairs(batch_size, streams.data).to(dev) if self.teacher_pairs else None
        return StateBatch(x_t.to(dev), k.to(dev), t.to(dev), {kk: v.to(dev) for kk, v in cond.items()},
                          source.to(dev), x0_real.to(dev), noise.to(dev), {kk: v.to(dev) for kk, v in cond_real.items()},
                          pairs, torch.bincount(source, minlength=3), fresh, induced)

    def _teacher_pairs(self, n: int, g: torch.Generator) -> TeacherPairs:
        """n (state on a teacher rollout at a student grid timestep, the rollout's final image) pairs."""
        r = torch.randint(self.data.rollout_states.shape[0], (n,), generator=g)
        k = torch.randint(self.grid.num_steps, (n,), generator=g)
        x_t = self.data.rollout_states[r, self.rollout_pos[k]].float()
        cond = {key: v[self.data.rollout_ref[r]].float() for key, v in self.data.cond.items()}
        return TeacherPairs(x_t, self.grid.timesteps[k], cond, self.data.rollout_x0[r].float())

    def _teacher_plan(self, j: int, g: torch.Generator) -> list[bool]:
        """Which of the first j grid intervals the teacher takes (the student takes the rest)."""
        if self.config.teacher_mode == "mixed":  # teacher for the first m steps, then the student
            return [i < self.config.mixed_teacher_steps for i in range(j)]
        draws = torch.rand(j, generator=g, dtype=torch.float64)  # bernoulli: per step
        return [bool(d < self.config.bernoulli_teacher_p) for d in draws]

    def _mixed_rollout(self, j: int, teacher_takes: list[bool], prompt_idx: torch.Tensor, g) -> torch.Tensor:
        x = torch.randn(len(prompt_idx), *self.data.latents.shape[1:], generator=g).to(self.device)
        cond = {key: v.to(self.device, torch.float32) for key, v in index_cond(self.data.cond, prompt_idx).items()}
        with torch.no_grad():
            for i, by_teacher in enumerate(teacher_takes):
                x = self.teacher_step(x, self.grid, i, cond) if by_teacher else self.student_step(x, i, cond, g)
        return x.cpu()

    def _student_states(self, step, j, prompt_idx, n_student, g):
        """Fresh student rollouts (all of them without a buffer), or a refresh of the buffer followed by a draw from
        it. The refresh count is refresh_fraction x n_student, rounded stochastically, so a step may make none and
        skip the rollout entirely: that is where the buffer saves UNet calls."""
        if self.buffer is None:
            n_fresh = n_student
        else:
            want = self.config.buffer.refresh_fraction * n_student
            n_fresh = int(want) + int(float(torch.rand(1, generator=g)) < want - int(want))
            if len(self.buffer) == 0:
                n_fresh = max(n_fresh, 1)
        if n_fresh:
            refs = prompt_idx[:n_fresh]
            fresh_noise = torch.randn(n_fresh, *self.data.latents.shape[1:], generator=g)
            cond = {key: v.to(self.device, torch.float32) for key, v in index_cond(self.data.cond, refs).items()}
            states = student_rollout(lambda x, k, c: self.student_step(x, k, c, g), fresh_noise.to(self.device), j,
                                     cond).cpu()
            ks = torch.full((n_fresh,), j, dtype=torch.long)
            if self.buffer is None:
                return states, ks, refs, n_fresh
            self.buffer.insert(states, ks, refs, step, g)
        pick = self.buffer.sample(n_student, g)
        return self.buffer.x[pick].float(), self.buffer.k[pick].clone(), self.buffer.ref[pick].clone(), n_fresh
