"""CPU-sized LDM on the demo tokenizer's latents of the bundled photos (8 classes), on the encoded dataset of
`configs/gpt_demo.py`; settings in `vqlc_jax.generators.config.latent_demo_config`. Variant `:smoke` runs a few steps.

    python -m vqlc_jax.main --config configs/ldm_demo.py --workdir W/ldm --config.data.encoded_dir=W/encoded
"""

from vqlc_jax.generators.config import latent_demo_config


def get_config(arg: str | None = None):
    return latent_demo_config("ldm", arg, "configs/ldm_demo.py")
