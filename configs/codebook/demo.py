"""Codebook for the CPU demo: k-means over raw pixel patches of the bundled photos (no weights, no download).

    python -m vqlc_jax.codebook.build --config configs/codebook/demo.py --workdir /tmp/vqlc_demo/codebook

The bundled train split (~1,370 crops) at 32 px as `configs/demo.py` trains on; 4x4-pixel patches (48-d) on the
8x8 grid, 2x2-pooled: 16 vectors per crop (~22K rows); one global mini-batch k-means into 1,024 centres ->
codebook.npy [1024, 48] (`configs/demo.py`: quantizer num_codes=1024, codebook_dim=48).
"""

from vqlc_jax.codebook.build import base_config


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/codebook/demo.py: unknown variant {arg!r} (it has none)")
    c = base_config()
    c.data.update(name="bundled", options={"resolution": 32}, resolution=32)
    c.extractor.update(name="pixels", patch_size=4, pool=2)
    c.extract.update(global_batch_size=64, images_per_shard=512)
    c.codebook.update(mode="global", k=1024, final_inertia=True)
    c.kmeans.update(batch_size=2048, num_steps=200, log_every=50)
    return c.lock()
