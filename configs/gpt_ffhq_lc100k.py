"""Unconditional GPT on FFHQ token maps of VQGAN-LC (100K codes, f16): one class, as the release trains it.

    python -m vqlc_jax.main --config configs/gpt_ffhq_lc100k.py --workdir W --config.data.encoded_dir=ENC

FFHQ's 70,000 images (a `folder` source in the encode config) carry one label, so the class token is a learned
start token. The model and optimiser of `gpt_imagenet_lc100k`; 200 epochs at batch 256 with 5 of warm-up.
"""

from vqlc_jax.generators.config import base_config

FFHQ_IMAGES = 70_000


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/gpt_ffhq_lc100k.py: unknown variant {arg!r} (it has none)")
    c = base_config("gpt")
    c.global_batch_size = 256
    steps_per_epoch = FFHQ_IMAGES // c.global_batch_size
    c.total_steps = 200 * steps_per_epoch
    c.optimizer.warmup_steps = 5 * steps_per_epoch
    c.model.update(num_codes=100_000, num_classes=1, remat=True)
    c.sample.update(grid_classes=1, grid_per_class=16)
    return c
