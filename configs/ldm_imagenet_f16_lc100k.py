"""The paper's LDM on VQGAN-LC f16 (100K codes) ImageNet latents (Table 4: FID 8.36): the release's class-conditional
UNet (f16 configuration) and LDM's DDPM, DDIM sampling with 200 steps, eta 1 and guidance 1.6.

    python -m vqlc_jax.main --config configs/ldm_imagenet_f16_lc100k.py --workdir W --config.data.encoded_dir=ENC

ENC: the encode job with the f16 tokenizer. Labels are dropped to the null class 10% of the time, so the null class
that guidance uses is trained (the release never trains it). Variant `:release` diffuses unscaled latents and guides
the first 3 channels, as released. Baselines (VQGAN-FC / EMA, 16,384 codes): the same config on their encoded
datasets (every size is read off the data). The other tokenizer: `configs/ldm_imagenet_f8_lc100k.py`.
"""

from vqlc_jax.generators.config import base_config


def get_config(arg: str | None = None):
    c = base_config("ldm")
    c.model.update(preset="f16", num_classes=1_000, remat=True)
    c.sample.cfg_scale = 1.6
    if arg == "release":
        c.loss.latent_scale = "none"
        c.sample.cfg_channels = 3
    elif arg:
        raise ValueError(f"configs/ldm_imagenet_f16_lc100k.py: unknown variant {arg!r} (choices: release)")
    return c
