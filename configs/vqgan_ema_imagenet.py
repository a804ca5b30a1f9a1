"""Baseline VQGAN-EMA (decay 0.99, eps 1e-5, Laplace smoothing, commitment-only loss) at 16,384 codes,
with the encoder, decoder, data and schedule of `configs/vqgan_lc_imagenet_f16.py`.

    python -m vqlc_jax.main --config configs/vqgan_ema_imagenet.py --workdir /ckpt/vqgan_ema_imagenet_16k \
        --config.data.options.data_dir=/data/tfds --config.loss.lpips_path=/data/weights/lpips_vgg.npz

`--config.model.quantizer.num_codes=100000` gives the paper's 100K column.
"""

from vqlc_jax.train.config import base_config


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/vqgan_ema_imagenet.py: unknown variant {arg!r} (it has none)")
    c = base_config()
    c.model.quantizer = {"name": "ema", "num_codes": 16_384, "decay": 0.99, "eps": 1e-5, "alpha": 1.0, "beta": 0.0}
    return c
