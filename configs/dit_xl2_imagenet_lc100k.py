"""The paper's DiT-XL/2 on VQGAN-LC (100K codes, f16) ImageNet latents (Table 4: FID 10.8 with guidance 8).

    python -m vqlc_jax.generators.encode --tokenizer TOK --config configs/encode/imagenet_f16.py --workdir ENC
    python -m vqlc_jax.main --config configs/dit_xl2_imagenet_lc100k.py --workdir W --config.data.encoded_dir=ENC

DiT-XL/2 (28 x 1152, 16 heads, patch 2 on the 16x16x8 latent: 64 tokens), learned sigma, DiT's Gaussian diffusion
(linear betas, 1000 steps, hybrid loss), AdamW lr 1e-4 constant without weight decay, batch 256, 400K steps, EMA
0.9999, 10% label dropout; 250 ancestral steps with guidance 8 on every latent channel. Unlike the release, the
latents are normalised per channel with the encode job's statistics; variant `:release` diffuses them unscaled and
guides only the first 3 channels, as released. Baselines (VQGAN-FC / EMA, 16,384 codes): the same config on their
encoded datasets (every size is read off the data).
"""

from vqlc_jax.generators.config import base_config


def get_config(arg: str | None = None):
    c = base_config("dit")
    c.model.update(size="XL", num_classes=1_000, remat=True)
    if arg == "release":
        c.loss.latent_scale = "none"
        c.sample.cfg_channels = 3
    elif arg:
        raise ValueError(f"configs/dit_xl2_imagenet_lc100k.py: unknown variant {arg!r} (choices: release)")
    return c
