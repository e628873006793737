"""The digits demo that `ddil prepare-demo` builds (docs/demo.md: the embedded default and its recipe).

scikit-learn's bundled digits become an image-caption dataset; on it this package trains, in a few minutes on a
2-core CPU, a tiny latent text-to-image teacher with the tiny://sd15 shapes (16x16 RGB, AutoencoderKL to 8x8x4, a
0.72M-parameter UNet2DConditionModel (demo.unet), a frozen random CLIP text encoder) and a digit classifier that
judges prompt adherence and provides features for Fréchet distance. Hyper-parameters live in `Config.demo`.

data.py      the digits as tensors, and the image folders (captions.jsonl) written for the pipeline
vae.py       AutoencoderKL training and the per-channel latent normalisation folded into its weights
teacher.py   the frozen text encoder and the teacher UNet's training (Min-SNR, EMA, caption dropout)
quality.py   prompted-digit accuracy and Fréchet distance of a pipeline's samples
training.py  the optimisation loop the VAE and the teacher share (progress, thread tuner, wall-clock guard)
threads.py   the fixed torch thread count, or the tuner that adapts it to a shared CPU
export.py    small files for DVC: the training-loss plot data, metrics copied out of output folders
"""
