"""Layer 1, pure tensors: noise schedules, parameterisations, DDIM and consistency steps, reflection."""
from ddil_core.math.schedule import NoiseSchedule, ddim_timesteps, ddim_prev_timestep
from ddil_core.math.parameterization import classifier_free_guidance, to_x0_eps, x0_to_eps, to_model_output
from ddil_core.math.ddim import ddim_step, ddim_step_from_output
from ddil_core.math.reflection import threshold_x0, reflect
from ddil_core.math.consistency import consistency_scalings, consistency_function

__all__ = [
    "NoiseSchedule", "ddim_timesteps", "ddim_prev_timestep", "classifier_free_guidance", "to_x0_eps", "x0_to_eps",
    "to_model_output", "ddim_step", "ddim_step_from_output", "threshold_x0", "reflect", "consistency_scalings",
    "consistency_function",
]
