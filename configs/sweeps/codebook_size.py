"""Table 7: VQGAN-LC with codebooks of growing size N (each a k-means codebook of N centres, built by the sweep).

    python -m vqlc_jax.analysis sweep --config configs/sweeps/codebook_size.py --workdir /tmp/sweep_size
    python -m vqlc_jax.analysis sweep --config configs/sweeps/codebook_size.py:imagenet --workdir /ckpt/sweep_size \
        --set data.options.data_dir=/data/tfds --set loss.lpips_path=/data/weights/lpips_vgg.npz \
        --codebook-set extractor.checkpoint=/data/clip-vit-large-patch14 \
        --codebook-set data.options.data_dir=/data/tfds

Variant `demo` (default): configs/demo.py on the bundled photos, N in {128, 256, 512, 1024} (global k-means of the
pixel-patch features). Variant `imagenet`: the paper's f16 recipe, N in {1K, 10K, 50K, 100K} (the release's
per-class k-means, N / 1000 centres per class).
"""

from vqlc_jax.analysis.sweeps import new_sweep

SIZES = {"demo": (128, 256, 512, 1024), "imagenet": (1_000, 10_000, 50_000, 100_000)}
CENTRES_PER_CODE = {"demo": 1, "imagenet": 1_000}  # codebook.k = N / this (global vs per-class k-means)


def get_config(arg: str | None = None):
    c = new_sweep("Table 7: codebook size", arg, __file__)
    variant = arg or "demo"
    c.runs = [dict(overrides={"model.quantizer.num_codes": n}, codebook={"codebook.k": n // CENTRES_PER_CODE[variant]})
              for n in SIZES[variant]]
    return c
