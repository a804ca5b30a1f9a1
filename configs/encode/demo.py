"""Encode the bundled photos with the demo tokenizer, flips included: the CPU demo's token and latent dataset.

    python -m vqlc_jax.generators.encode --tokenizer /tmp/vqlc_demo/tokenizer --config configs/encode/demo.py \
        --workdir /tmp/vqlc_demo/encoded

The bundled train split (~1,370 crops) at 32 px as `configs/demo.py` trains the tokenizer on (its export in
`workdir/tokenizer`); each crop and its mirror image: token maps 8x8, latents 8x8xD'.
"""

from vqlc_jax.generators.encode import base_config


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/encode/demo.py: unknown variant {arg!r} (it has none)")
    c = base_config()
    c.data.update(name="bundled", split="train", options={"resolution": 32}, resolution=32)
    c.encode.update(flip=True, global_batch_size=64, images_per_shard=512)
    return c.lock()
