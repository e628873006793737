"""Run under torchrun: every rank draws batches with a DIFFERENT generator, yet all agree on the student-rollout
step count of each batch because rank 0's value is broadcast. Prints OK on rank 0."""
import torch
import torch.distributed as dist

from ddil_core.config import load_config
from ddil_core.math.schedule import NoiseSchedule
from ddil_core.method.grid import StudentGrid
from ddil_core.method.batch import TrainingData
from ddil_core.method.mixture import DDILMixture


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(100 + rank)  # deliberately different per rank
    data = TrainingData(torch.randn(16, 4, 8, 8), {"encoder_hidden_states": torch.randn(16, 5, 8)})
    config = load_config(None, ["ddil.priors.forward=0", "ddil.priors.teacher=0", "ddil.priors.student=1",
                                "ddil.buffer.enabled=false"]).ddil
    seen = []

    def step(x, k, cond, generator=None):
        return x * 0.9

    def shared(value):
        t = torch.tensor([value])
        dist.broadcast(t, src=0)
        return int(t)

    mixture = DDILMixture(config, data, NoiseSchedule.from_config({}), StudentGrid.ddim_trailing(1000, 8), step,
                          shared_int=shared)
    for i in range(20):
        batch = mixture.sample(i, 4, g)
        seen.append(int(batch.t[0]))
        assert (batch.t == batch.t[0]).all()  # one step count for the whole batch
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, seen)
    assert all(s == everyone[0] for s in everyone), everyone
    assert len(set(seen)) > 1  # the step count does vary from batch to batch
    if rank == 0:
        print("OK", seen)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
