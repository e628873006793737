"""DDIL: diffusion distillation with imitation learning (arXiv 2410.11971) over PD, LCM and DMD2."""
__version__ = "0.1.0"
