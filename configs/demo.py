"""CPU-sized VQGAN-LC on the bundled photos (no download): the README's main job.

    python -m vqlc_jax.main --config configs/demo.py --workdir /tmp/vqlc_demo \
        --config.codebook_path=/tmp/vqlc_demo/codebook/codebook.npy

The codebook comes from `configs/codebook/demo.py` (pixel-patch features of the same images, k-means).
Variant `:smoke` runs a few steps (used by the tests).
"""

from vqlc_jax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.global_batch_size = 16
    c.total_steps = 600
    c.log_every_steps = 50
    c.checkpoint_every_steps = 200
    c.eval_every_steps = 300
    c.data.name = "bundled"
    c.data.resolution = 32
    c.data.options = {"resolution": 32}
    c.model.ddconfig.update(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                            z_channels=32)
    c.model.quantizer.update(num_codes=1024, codebook_dim=48, chunk_size=1024)
    c.loss.update(allow_missing_lpips=True, disc_start=400)
    c.optimizer.update(lr=1e-3, disc_lr=1e-3, warmup_steps=50)
    if arg == "smoke":  # seconds on a CPU: a tiny model, a few steps, the GAN switched on at step 4
        c.global_batch_size = 8
        c.total_steps = 6
        c.log_every_steps = 2
        c.checkpoint_every_steps = 3
        c.eval_every_steps = 6
        c.data.resolution = 16
        c.data.options = {"resolution": 16}
        c.data.eval_max_images = 16
        c.model.ddconfig.update(resolution=16, ch_mult=(1, 2), attn_resolutions=(), z_channels=8)
        c.model.quantizer.update(num_codes=64, codebook_dim=16, chunk_size=32)
        c.model.embed_dim = 4
        c.codebook_init = "random"
        c.loss.disc_start = 3
        c.loss.disc_layers = 1
        c.optimizer.warmup_steps = 2
    elif arg:
        raise ValueError(f"configs/demo.py: unknown variant {arg!r} (choices: smoke)")
    return c
