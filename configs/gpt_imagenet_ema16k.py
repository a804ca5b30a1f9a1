"""Baseline of the paper's Table 4: the GPT of `gpt_imagenet_lc100k` on VQGAN-EMA token maps (16,384 codes).

    python -m vqlc_jax.main --config configs/gpt_imagenet_ema16k.py --workdir W --config.data.encoded_dir=ENC

ENC: `python -m vqlc_jax.generators.encode` with the VQGAN-EMA tokenizer trained by `configs/vqgan_ema_imagenet.py`.
"""

from vqlc_jax.generators.config import apply_variant, base_config


def get_config(arg: str | None = None):
    c = base_config("gpt")
    c.model.update(num_codes=16_384, num_classes=1_000, remat=True)
    return apply_variant(c, arg, "configs/gpt_imagenet_ema16k.py")
