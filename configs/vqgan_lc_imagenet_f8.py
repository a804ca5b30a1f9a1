"""VQGAN-LC, ImageNet 256 px, f8 (32x32 = 1024 tokens per image), 100K frozen CLIP codebook, D'=4 as the released
f8 model; otherwise the f16 recipe.

    python -m vqlc_jax.main --config configs/vqgan_lc_imagenet_f8.py --workdir /ckpt/vqgan_lc_f8 \
        --config.codebook_path=/data/codebooks/imagenet_clip_vitl14/codebook.npy \
        --config.data.options.data_dir=/data/tfds --config.loss.lpips_path=/data/weights/lpips_vgg.npz
"""

from vqlc_jax.train.config import base_config


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/vqgan_lc_imagenet_f8.py: unknown variant {arg!r} (it has none)")
    c = base_config()
    c.model.ddconfig.ch_mult = (1, 2, 2, 4)
    c.model.embed_dim = 4
    return c
