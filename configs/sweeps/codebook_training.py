"""Table 9: a static codebook with a trained projector (VQGAN-LC) vs a trained codebook without a projector.

    python -m vqlc_jax.analysis sweep --config configs/sweeps/codebook_training.py --workdir /tmp/sweep_training
    (variant `:imagenet`: add the --set / --codebook-set paths of configs/sweeps/codebook_size.py)

Runs, at the same N, D' and recipe (in the release's terms: `tuning_codebook` / `use_cblinear`):
  static+linear  the k-means codebook frozen, a linear projector trained: VQGAN-LC (0 / 1)
  static+mlp     the same with the MLP projector (0 / 2)
  trained        a codebook trained in the D'-dim latent space, no projector, uniform +-1/N init: the `vq`
                 quantizer (-1 / 0)
Not covered: a trained k-means-initialised codebook with (1 / 1) or without (1 / 0) a projector; the `lc`
quantizer keeps its codebook frozen. Variant `demo` (default): N = 1024; `imagenet`: N = 100K.
"""

from vqlc_jax.analysis.sweeps import new_sweep

NUM_CODES = {"demo": 1024, "imagenet": 100_000}


def get_config(arg: str | None = None):
    c = new_sweep("Table 9: static codebook + projector vs trained codebook", arg, __file__)
    trained = {"name": "vq", "num_codes": NUM_CODES[arg or "demo"], "alpha": 1.0, "beta": 0.33}
    c.runs = [dict(name="static+linear", codebook={}),
              dict(name="static+mlp", overrides={"model.quantizer.projector": "mlp"}, codebook={}),
              dict(name="trained", overrides={"model.quantizer": trained})]
    return c
