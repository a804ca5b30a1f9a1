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
    c.loss.update(allow_missing_lpips=True, disc_start=400, quant_weight=1.0)
    c.optimizer.update(lr=1e-3, disc_lr=1e-3, warmup_steps=50)
    if arg == "smoke":
        c.total_steps = 6
        c.log_every_steps = 2
        c.checkpoint_every_steps = 3
        c.eval_every_steps = 6
        c.loss.disc_start = 3
        c.model.quantizer.num_codes = 64
        c.codebook_init = "random"
        c.data.eval_max_images = 16
        c.optimizer.warmup_steps = 2
    return c
