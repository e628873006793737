"""Layer 2: load and save diffusers pipelines (SD 1.5 and SDXL families), text conditioning, the denoiser."""


def placement(module):
    """(device, dtype) of a module's first parameter. diffusers' `ModelMixin.device` / `.dtype` walk every submodule
    (~0.6 ms each on a CPU), which a few-step sampler would otherwise pay on every call."""
    first = next(module.parameters())
    return first.device, first.dtype
