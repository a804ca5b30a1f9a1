"""Unconditional LDM on FFHQ latents of VQGAN-LC (100K codes, f16): one class, no guidance.

    python -m vqlc_jax.main --config configs/ldm_ffhq_lc100k.py --workdir W --config.data.encoded_dir=ENC

FFHQ's 70,000 images (a `folder` source in the encode config) carry one label, so the class context is a learned
constant; the f16 UNet and LDM's DDPM as `ldm_imagenet_f16_lc100k`, DDIM 200 steps with eta 1, batch 256.
"""

from vqlc_jax.generators.config import base_config


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/ldm_ffhq_lc100k.py: unknown variant {arg!r} (it has none)")
    c = base_config("ldm")
    c.model.update(preset="f16", num_classes=1, remat=True)
    c.loss.class_dropout = 0.0
    c.sample.update(cfg_scale=1.0, grid_classes=1, grid_per_class=16)
    return c
