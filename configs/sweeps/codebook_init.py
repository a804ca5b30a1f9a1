"""Table 6: how the frozen codebook is initialised: random, random selection, or k-means (the paper's).

    python -m vqlc_jax.analysis sweep --config configs/sweeps/codebook_init.py --workdir /tmp/sweep_init
    (variant `:imagenet`: add the --set / --codebook-set paths of configs/sweeps/codebook_size.py)

The three codebooks come from the codebook builder's `codebook.method` on the same features: `random` (Gaussian
with the features' per-dimension mean and std), `random_selection` (N distinct feature rows), `kmeans` (k-means
centres). Variant `demo` (default): configs/demo.py, N = 1024, global. Variant `imagenet`: N = 100K; k-means per
class as the release, the other two over all rows (they have no per-class mode).
"""

from vqlc_jax.analysis.sweeps import new_sweep

METHODS = ("random", "random_selection", "kmeans")
GLOBAL_100K = {"codebook.mode": "global", "codebook.k": 100_000}


def get_config(arg: str | None = None):
    c = new_sweep("Table 6: codebook initialisation", arg, __file__)
    imagenet = arg == "imagenet"
    c.runs = [dict(name=m, codebook={"codebook.method": m, **(GLOBAL_100K if imagenet and m != "kmeans" else {})})
              for m in METHODS]
    return c
