"""The paper's SiT-XL/2 on VQGAN-LC (100K codes, f16) ImageNet latents (Table 4: FID 8.40 with guidance 8).

    python -m vqlc_jax.main --config configs/sit_xl2_imagenet_lc100k.py --workdir W --config.data.encoded_dir=ENC

The DiT-XL/2 backbone without the sigma half, SiT's Linear path with velocity prediction, AdamW lr 1e-4 constant,
batch 256, 400K steps, EMA 0.9999, 10% label dropout; sampling with diffrax's dopri5 (atol 1e-6, rtol 1e-3) and
guidance 8 on every latent channel (`--config.sample.sampler=sde` for Euler-Maruyama). Variant `:release` diffuses
unscaled latents and guides the first 3 channels, as released. Baselines (VQGAN-FC / EMA, 16,384 codes): the same
config on their encoded datasets (every size is read off the data).
"""

from vqlc_jax.generators.config import base_config


def get_config(arg: str | None = None):
    c = base_config("sit")
    c.model.update(size="XL", num_classes=1_000, remat=True)
    if arg == "release":
        c.loss.latent_scale = "none"
        c.sample.cfg_channels = 3
    elif arg:
        raise ValueError(f"configs/sit_xl2_imagenet_lc100k.py: unknown variant {arg!r} (choices: release)")
    return c
