"""CPU-sized SiT on the demo tokenizer's latents of the bundled photos (8 classes), on the encoded dataset of
`configs/gpt_demo.py`; settings in `vqlc_jax.generators.config.latent_demo_config`. Variant `:smoke` runs a few steps.

    python -m vqlc_jax.main --config configs/sit_demo.py --workdir W/sit --config.data.encoded_dir=W/encoded
"""

from vqlc_jax.generators.config import latent_demo_config


def get_config(arg: str | None = None):
    return latent_demo_config("sit", arg, "configs/sit_demo.py")
