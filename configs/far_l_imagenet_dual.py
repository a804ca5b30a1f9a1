"""FAR-L on FQGAN-Dual ImageNet token maps: the paper's best generator (gFID 3.08 with the ADM evaluator, cfg 2.0).

    python -m vqlc_jax.generators.encode --tokenizer FQGAN --config configs/encode/imagenet_f16.py --workdir ENC
    python -m vqlc_jax.main --config configs/far_l_imagenet_dual.py --workdir W --config.data.encoded_dir=ENC

The recipe of configs/far_b_imagenet_dual.py (batch 256, 300 epochs, AdamW lr 1e-4, weight decay 0.05, 10% label
dropout, guidance 2.0, top-k off, temperature 1) at the large size: 36 layers x 1280, 20 heads, AR head of 4 layers.
Variant `:triple`: FQGAN-Triple's three sub-codebooks.
"""

from vqlc_jax.generators.config import far_imagenet_config


def get_config(arg: str | None = None):
    return far_imagenet_config("L", arg, "configs/far_l_imagenet_dual.py")
