"""Sharded training (training.fsdp) on 2 CPU processes (torchrun, gloo): FSDP2's fully_shard, the code a GPU node
runs. accelerate's FSDP plugin itself cannot run here: accelerate 1.15 turns an FSDP launch on a CPU into plain DDP
(DistributedType MULTI_CPU), so the loop shards by itself (ddil_core/training/fsdp.py) and these tests run that.

Checked: 2 sharded processes give the 1-process update; checkpoints hold the full optimiser state (gathered from the
shards) and a run stopped and resumed on 2 processes reaches the uninterrupted run's weights exactly."""
import pytest
import torch

from ddil_core.config import ConfigError
from ddil_core.stages.distill import distill
from ddil_core.training.fsdp import check_supported
from tests import ROOT
from tests.conftest import tiny_config
from tests.training.test_ddp import _distill_on_two, _unet

FSDP = ["training.fsdp=true"]
DMD2 = ["objective.name=dmd2", "objective.student_steps=4", "objective.dmd2.dfake_gen_update_ratio=2",
        "objective.dmd2.gan=true", "training.gradient_checkpointing=true"]


def test_sharded_pd_matches_one_process_and_resumes_with_its_optimiser_state(tiny_data, tmp_path):
    latents, rollouts = tiny_data["sd15"]
    single = _unet(distill(tiny_config("sd15"), latents, [rollouts], tmp_path / "single").parent)
    both = _distill_on_two(latents, rollouts, tmp_path / "fsdp", *FSDP)
    assert both.returncode == 0, both.stderr[-3000:]
    sharded = _unet(tmp_path / "fsdp")
    for key in single:  # summation order differs across ranks: equal up to float rounding through Adam
        assert torch.allclose(sharded[key], single[key], atol=1e-4, rtol=0), key

    # the checkpoint holds every parameter's AdamW state in full (the DMD2 anchor's FSDP checkpoints drop it)
    ckpt = sorted((tmp_path / "fsdp" / "checkpoints").iterdir())[-1]
    optim = torch.load(ckpt / "optimizers.pt", weights_only=True)["student"]
    assert set(optim["state"]) == set(sharded)  # keyed by parameter name
    for name, state in optim["state"].items():
        assert state["exp_avg_sq"].shape == sharded[name].shape and float(state["step"]) == 6, name

    # stop after 4 steps, resume to 6 on two sharded processes: the uninterrupted sharded run's weights
    first = _distill_on_two(latents, rollouts, tmp_path / "resumed", *FSDP, "training.steps=4",
                            "objective.pd.steps_per_stage=6")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _distill_on_two(latents, rollouts, tmp_path / "resumed", *FSDP)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    resumed = _unet(tmp_path / "resumed")
    for key in sharded:
        assert torch.allclose(resumed[key], sharded[key], atol=1e-6, rtol=0), key


def test_sharded_dmd2_with_gan_and_checkpointing_matches_one_process(tiny_data, tmp_path):
    """Compared as updates, as tests/training/test_ddp.py does for DMD2 (float rounding through Adam: ~0.03% here)."""
    from ddil_core.models.tiny import build_tiny_pipeline

    latents, rollouts = tiny_data["sd15"]
    single = _unet(distill(tiny_config("sd15", *DMD2), latents, [rollouts], tmp_path / "single").parent)
    both = _distill_on_two(latents, rollouts, tmp_path / "fsdp", *DMD2, *FSDP)
    assert both.returncode == 0, both.stderr[-3000:]
    sharded = _unet(tmp_path / "fsdp")
    init = build_tiny_pipeline("sd15").unet.state_dict()
    update = sum(float((single[k] - init[k]).double().pow(2).sum()) for k in single) ** 0.5
    apart = sum(float((sharded[k] - single[k]).double().pow(2).sum()) for k in single) ** 0.5
    assert update > 0 and apart < 0.01 * update, f"{apart / update:.2%} of the update apart"


@pytest.mark.parametrize("overrides, why", [
    (["objective.name=lcm"], "objective lcm"),
    (["training.lora.rank=4"], "LoRA"),
    (["training.ema.enabled=true"], "training.ema"),
])
def test_what_sharding_does_not_do_is_refused_with_the_reason(overrides, why):
    config = tiny_config("sd15", *FSDP, *overrides)
    with pytest.raises(ConfigError, match=why):
        check_supported(config, config.objective.name, 1)
    with pytest.raises(ConfigError, match="several stages"):
        check_supported(tiny_config("sd15", *FSDP), "pd", 2)


def test_the_accelerate_fsdp_config_is_what_accelerate_reads_as_fsdp2():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = ROOT / "configs" / "accelerate" / "fsdp.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == DistributedType.FSDP and config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT" and config.mixed_precision == "bf16"
