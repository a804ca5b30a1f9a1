"""The Figure 1b baseline on VQGAN-FC (16,384 codes) token maps: `classify_imagenet_lc100k.py:learned`'s recipe.

    python -m vqlc_jax.main --config configs/classify_imagenet_fc16k.py --workdir W --config.data.encoded_dir=ENC \
        --config.data.eval_encoded_dir=VAL --config.classifier.init_checkpoint=/path/mae_pretrain_vit_base.pth

ENC / VAL: ImageNet train / validation encoded by the FC tokenizer (the commands in classify_imagenet_lc100k.py).
Learned token table: the FC codebook is trained, not a frozen feature codebook (`:learned` is accepted).
"""

from vqlc_jax.train.classifier import imagenet_config


def get_config(arg: str | None = None):
    return imagenet_config(16_384, "learned", arg, "configs/classify_imagenet_fc16k.py")
