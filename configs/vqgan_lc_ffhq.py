"""VQGAN-LC on FFHQ 256 px (an image folder `root/train/*.png`, `root/validation/*.png`), f16, 100K codebook
from a global k-means over FFHQ CLIP features (no classes), 800 epochs as the paper.

    python -m vqlc_jax.main --config configs/vqgan_lc_ffhq.py --workdir /ckpt/vqgan_lc_ffhq \
        --config.data.options.root=/data/ffhq --config.codebook_path=/data/codebooks/ffhq/codebook.npy \
        --config.loss.lpips_path=/data/weights/lpips_vgg.npz
"""

from vqlc_jax.train.config import base_config

FFHQ_TRAIN_IMAGES = 60_000


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/vqgan_lc_ffhq.py: unknown variant {arg!r} (it has none)")
    c = base_config()
    steps_per_epoch = FFHQ_TRAIN_IMAGES // c.global_batch_size
    c.total_steps = 800 * steps_per_epoch
    c.optimizer.warmup_steps = 5 * steps_per_epoch
    c.data.update(name="folder", options={"root": ""})
    return c
