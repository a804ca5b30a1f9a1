"""VQGAN-LC, ImageNet 256 px, f16 (16x16 tokens), 100K frozen CLIP codebook, D'=8, linear projector: the paper's
main setting (20 epochs at global batch 256, lr 5e-4, 5 warm-up epochs, Adam 0.5/0.9, disc from step 20K).

    python -m vqlc_jax.main --config configs/vqgan_lc_imagenet_f16.py --workdir /ckpt/vqgan_lc_f16 \
        --config.codebook_path=/data/codebooks/imagenet_clip_vitl14/codebook.npy \
        --config.data.options.data_dir=/data/tfds --config.loss.lpips_path=/data/weights/lpips_vgg.npz

The codebook comes from `configs/codebook/imagenet_clip_vitl14.py`. Variant `:mlp` uses the MLP projector.
"""

from vqlc_jax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    if arg == "mlp":
        c.model.quantizer.projector = "mlp"
    elif arg:
        raise ValueError(f"configs/vqgan_lc_imagenet_f16.py: unknown variant {arg!r} (choices: mlp)")
    return c
