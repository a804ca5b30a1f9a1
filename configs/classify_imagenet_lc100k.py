"""ImageNet classification from VQGAN-LC (100K codes, f16) token maps: the paper's Figure 1b (LC 75.7 top-1).

    python -m vqlc_jax.generators.encode --tokenizer TOK --config configs/encode/imagenet_f16.py --workdir ENC
    python -m vqlc_jax.generators.encode --tokenizer TOK --config configs/encode/imagenet_f16.py --workdir VAL \
        --config.data.split=validation
    python -m vqlc_jax.main --config configs/classify_imagenet_lc100k.py --workdir W --config.data.encoded_dir=ENC \
        --config.data.eval_encoded_dir=VAL --config.classifier.init_checkpoint=/path/mae_pretrain_vit_base.pth

ViT-B over the 16x16 token map (256 tokens), blocks from MAE's pretrained ViT-B, MAE's fine-tuning recipe
(`vqlc_jax.train.classifier.base_config`: batch 1024, 100 epochs, layer decay 0.65, label smoothing 0.1, drop path
0.1). Token embedding: a trained linear map of each token's frozen CLIP-feature codebook row (the tokenizer's);
variant `:learned`: a learned table over the 100,000 codes (the paper gives no recipe beyond "ViT-B, MAE").
"""

from vqlc_jax.train.classifier import imagenet_config


def get_config(arg: str | None = None):
    return imagenet_config(100_000, "codebook", arg, "configs/classify_imagenet_lc100k.py")
