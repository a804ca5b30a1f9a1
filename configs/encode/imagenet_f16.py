"""Encode ImageNet-1k train at 256 px with an f16 tokenizer (16x16 tokens), no flips: what the VQGAN-LC release's
GPT trains on.

    python -m vqlc_jax.generators.encode --tokenizer vqgan_lc_f16 --config configs/encode/imagenet_f16.py \
        --workdir DIR --config.data.options.data_dir=/data/tfds

The tokenizer directory is a `Tokenizer.save` (e.g. of `Tokenizer.from_official_checkpoint`, see the README).
ImageNet is read as prepared by `python -m vqlc_jax.data.imagenet`. 1,281,167 images in 126 shards of 10,240:
1 KB of int32 tokens and, with the release's D' = 8, 4 KB of float16 latents per image (~6.6 GB in all).
"""

from vqlc_jax.generators.encode import base_config


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/encode/imagenet_f16.py: unknown variant {arg!r} (it has none)")
    c = base_config()
    c.data.update(name="imagenet2012", split="train", options={"data_dir": "~/tensorflow_datasets"}, resolution=256)
    c.encode.update(flip=False, global_batch_size=256, images_per_shard=10_240)
    return c.lock()
