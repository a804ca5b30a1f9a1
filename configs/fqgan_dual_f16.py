"""FQGAN-Dual, ImageNet 256 px, f16: a visual and a semantic sub-codebook (2 x 16,384 l2-normalised codes of
dim 8), the semantic branch's FeatPredHead (width 1024) trained against CLIP ViT-L/14's CLS feature (InfoNCE, 0.5),
disentanglement 0.1; the release's recipe (`vqlc_jax.train.config.fqgan_config`: L2 + LPIPS + PatchGAN 0.5 from
20K without adaptive weight, Adam 0.9/0.95 lr 2e-4 constant, grad clip 1, 40 epochs at batch 256).

    python -m vqlc_jax.main --config configs/fqgan_dual_f16.py --workdir /ckpt/fqgan_dual_f16 \
        --config.loss.teachers.sem.path=/weights/clip-vit-large-patch14 \
        --config.data.options.data_dir=/data/tfds --config.loss.lpips_path=/data/weights/lpips_vgg.npz

The teacher folder is a Hugging Face `openai/clip-vit-large-patch14` folder (config.json + model.safetensors).
Variant `:noteacher` trains without the representation loss (no FeatPredHead, no teacher).
"""

from vqlc_jax.train.config import L2VQ_16K, fqgan_config


def get_config(arg: str | None = None):
    if arg not in (None, "noteacher"):
        raise ValueError(f"configs/fqgan_dual_f16.py: unknown variant {arg!r} (choices: noteacher)")
    teachers = {} if arg == "noteacher" else {"sem": ("clip", 1024)}
    return fqgan_config({"vis": L2VQ_16K, "sem": L2VQ_16K}, teachers)
