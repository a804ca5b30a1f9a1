"""The paper's LDM on VQGAN-LC (100K codes) ImageNet latents (Table 4: FID 8.36 at f16; 4.81 at f8 with 1,024
tokens): the release's class-conditional UNet and LDM's DDPM, DDIM sampling with 200 steps, eta 1, guidance 1.6.

    python -m vqlc_jax.main --config configs/ldm_imagenet_lc100k.py --workdir W --config.data.encoded_dir=ENC
    python -m vqlc_jax.main --config configs/ldm_imagenet_lc100k.py:f8 ...   # the f8 tokenizer's 32x32x4 latents

Labels are dropped to the null class 10% of the time, so the null class that guidance uses is trained (the release
never trains it). Variant `:release` diffuses unscaled latents and guides the first 3 channels; `:f8` uses the f8
UNet (channel_mult 1, 2, 4; 2 residual blocks) and guidance 1.4.
"""

from vqlc_jax.generators.config import base_config


def get_config(arg: str | None = None):
    c = base_config("ldm")
    c.model.update(num_classes=1_000, remat=True)
    if arg == "release":
        c.loss.latent_scale = "none"
        c.sample.cfg_channels = 3
    elif arg == "f8":
        c.model.preset = "f8"
        c.sample.cfg_scale = 1.4
    elif arg:
        raise ValueError(f"configs/ldm_imagenet_lc100k.py: unknown variant {arg!r} (choices: release, f8)")
    return c
