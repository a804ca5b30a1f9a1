"""`classify_imagenet_fc16k.py` on the VQGAN-EMA tokenizer's token maps (16,384 codes): EMA's Figure 1b bar.

    python -m vqlc_jax.main --config configs/classify_imagenet_ema16k.py --workdir W --config.data.encoded_dir=ENC \
        --config.data.eval_encoded_dir=VAL --config.classifier.init_checkpoint=/path/mae_pretrain_vit_base.pth
"""

from vqlc_jax.train.classifier import imagenet_config


def get_config(arg: str | None = None):
    return imagenet_config(16_384, "learned", arg, "configs/classify_imagenet_ema16k.py")
