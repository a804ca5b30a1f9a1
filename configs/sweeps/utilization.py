"""Shared settings of `benchmarks/utilization_sweep.py` (codebook utilization of vq, fc, ema and lc vs codebook size,
the paper's Table 1 pattern); read by that script, not by `vqlc_jax.analysis`.

    nice -n 5 python benchmarks/utilization_sweep.py [--quick]   # --quick: this file's variant `quick`

`train`: the trainer config of every run: configs/demo.py's model, data and loss (bundled photos at 32 px, ch 32,
ch_mult (1, 2, 2), 8x8 = 64 tokens per image, D' = 8, batch 16, seed 0, quantization loss x 0.1 as the release
scripts), 300 steps, evaluated once at the end on the whole validation split; GAN off (`loss.disc_start` =
total_steps, so it never starts); LPIPS loss only with `loss.lpips_path` (no weights here). `quantizers`: each
method's quantizer options (the release's / the imagenet configs'); the script adds num_codes and chunk_size, and
for the lc methods (linear and MLP projector, configs/demo.py's 48-d codebook) codebook_path.
`codebook`: the lc codebooks' build config: configs/codebook/demo.py on the train split rendered at 64 px,
un-pooled 4x4-pixel patches (256 48-d vectors per crop, ~350K rows, ~243K distinct; 32 px gives only ~61K distinct
rows). k-means (k random rows as init) where the features hold >= `kmeans_rows_per_code` rows per code, else
`random_selection` of distinct rows (the paper's Table 6: nearly as good as k-means for LC).
Variant `quick`: a 1-2 minute smoke run (16 px model, N = 256, 10 steps, 32 validation images).
"""

from __future__ import annotations

import pathlib

import ml_collections

from vqlc_jax.analysis.sweeps import load_config_file

CONFIGS = pathlib.Path(__file__).resolve().parents[1]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "quick"):
        raise ValueError(f"configs/sweeps/utilization.py: unknown variant {arg!r} (choices: quick)")
    c = ml_collections.ConfigDict()
    c.sizes = (1_024, 16_384, 100_000)
    c.methods = ("vq", "fc", "ema", "lc", "lc_mlp")
    c.max_chunk_size = 16_384
    c.kmeans_rows_per_code = 20
    # Each method's quantizer options (the release's / the imagenet configs'); lc methods also get a codebook.
    c.quantizers = dict(vq=dict(name="vq", alpha=1.0, beta=0.33), fc=dict(name="fc", code_dim=8, alpha=1.0, beta=0.33),
                        ema=dict(name="ema", decay=0.99, eps=1e-5, alpha=1.0, beta=0.0),
                        lc=dict(name="lc", projector="linear"), lc_mlp=dict(name="lc", projector="mlp"))

    train = load_config_file(CONFIGS / "demo.py")
    train.total_steps = 300
    train.log_every_steps = 50
    train.eval_every_steps = train.checkpoint_every_steps = train.total_steps
    train.keep_checkpoints = 1
    train.loss.disc_start = train.total_steps
    codebook = load_config_file(CONFIGS / "codebook" / "demo.py").unlock()
    codebook.data.update(options={"resolution": 64}, resolution=64)
    codebook.extractor.pool = 1
    codebook.extract.images_per_shard = 1_408
    codebook.codebook.update(final_inertia=False)
    codebook.kmeans.update(init="random", batch_size=4_096, num_steps=300, log_every=100)

    if arg == "quick":
        c.sizes = (256,)  # 16 rows per code: the random-selection path (k-means runs in the full sweep)
        train.total_steps = train.eval_every_steps = train.checkpoint_every_steps = train.loss.disc_start = 10
        train.log_every_steps = 5
        train.global_batch_size = 8
        train.optimizer.warmup_steps = 2
        train.data.update(resolution=16, options={"resolution": 16}, eval_max_images=32)
        train.model.ddconfig.update(resolution=16, ch_mult=(1, 2), attn_resolutions=(), z_channels=8)
        codebook.data.update(options={"resolution": 16}, resolution=16, max_images=64)  # 16 rows per crop
        codebook.kmeans.update(batch_size=256, num_steps=20)
    c.train = train
    c.codebook = codebook
    return c
