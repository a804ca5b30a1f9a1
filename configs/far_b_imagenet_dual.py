"""FAR-B, FQGAN's factorized autoregressive generator, on FQGAN-Dual ImageNet token maps (f16: 16x16 positions, each
a visual and a semantic code of 16,384), the release's `train_far_dual.sh` / `eval_far.sh`.

    python -m vqlc_jax.generators.encode --tokenizer FQGAN --config configs/encode/imagenet_f16.py --workdir ENC
    python -m vqlc_jax.main --config configs/far_b_imagenet_dual.py --workdir W --config.data.encoded_dir=ENC

24 layers x 1024, 16 heads, factorized AR head of 3 layers; batch 256, 300 epochs, AdamW lr 1e-4 constant, weight
decay 0.05, dropout 0.1, 10% label dropout; sampling with guidance 2.0 on every sub-token, top-k off, temperature 1;
activation checkpointing on. Variant `:triple`: FQGAN-Triple's three sub-codebooks (visual, DINO, CLIP).
"""

from vqlc_jax.generators.config import far_imagenet_config


def get_config(arg: str | None = None):
    return far_imagenet_config("B", arg, "configs/far_b_imagenet_dual.py")
