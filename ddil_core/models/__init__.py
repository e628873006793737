"""Layer 2: load and save diffusers pipelines (SD 1.5 and SDXL families), text conditioning, the denoiser."""
