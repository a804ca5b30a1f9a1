"""Table 10: the projected code dimension D' (`model.embed_dim`, the latent space the codes are projected into).

    python -m vqlc_jax.analysis sweep --config configs/sweeps/projected_dim.py --workdir /tmp/sweep_dim
    (variant `:imagenet`: add the --set / --codebook-set paths of configs/sweeps/codebook_size.py)

Every run shares one codebook (the base codebook config as it is). Variant `demo` (default): D' in {4, 8, 16}.
Variant `imagenet`: D' in {8, 16, 32, 64} (the paper's main setting is 8).
"""

from vqlc_jax.analysis.sweeps import new_sweep

DIMS = {"demo": (4, 8, 16), "imagenet": (8, 16, 32, 64)}


def get_config(arg: str | None = None):
    c = new_sweep("Table 10: projected dimension D'", arg, __file__)
    c.runs = [dict(overrides={"model.embed_dim": d}, codebook={}) for d in DIMS[arg or "demo"]]
    return c
