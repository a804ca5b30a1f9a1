"""The paper's class-conditional GPT on VQGAN-LC (100K codes, f16, 16x16 tokens) ImageNet token maps (Table 4).

    python -m vqlc_jax.generators.encode --tokenizer TOK --config configs/encode/imagenet_f16.py --workdir ENC
    python -m vqlc_jax.main --config configs/gpt_imagenet_lc100k.py --workdir W --config.data.encoded_dir=ENC

The release's minGPT: 24 layers, 16 heads, width 1024, learned positions, one table for the 100,000 codes and the
1,000 class ids, pkeep 0.8; batch 1024, 100 epochs with 5 of warm-up then linear decay, lr 4.5e-4, AdamW (0.9,
0.95); activation checkpointing on. Sampling with top-k = 10% of the codes (the paper; the release's scripts
truncate nothing). Variant `:cfg`: null class, 10% label dropout, guidance 2.0 (not in the release).
"""

from vqlc_jax.generators.config import apply_variant, base_config


def get_config(arg: str | None = None):
    c = base_config("gpt")
    c.model.update(num_codes=100_000, num_classes=1_000, remat=True)
    return apply_variant(c, arg, "configs/gpt_imagenet_lc100k.py")
