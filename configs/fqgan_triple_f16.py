"""FQGAN-Triple, ImageNet 256 px, f16: visual, mid-level and high-level sub-codebooks (3 x 16,384 codes of dim 8);
the mid branch learns DINOv2-small's CLS feature (width 384), the high branch CLIP ViT-B/16's (width 768), as the
release's `VQLoss_triple_codebook`; disentanglement over the three pairs. Recipe: `fqgan_config`.

    python -m vqlc_jax.main --config configs/fqgan_triple_f16.py --workdir /ckpt/fqgan_triple_f16 \
        --config.loss.teachers.mid.path=/weights/dinov2-small \
        --config.loss.teachers.high.path=/weights/clip-vit-base-patch16 \
        --config.data.options.data_dir=/data/tfds --config.loss.lpips_path=/data/weights/lpips_vgg.npz

Teacher folders: Hugging Face `facebook/dinov2-small` and `openai/clip-vit-base-patch16`.
"""

from vqlc_jax.train.config import L2VQ_16K, fqgan_config


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/fqgan_triple_f16.py: unknown variant {arg!r} (it has none)")
    return fqgan_config({"vis": L2VQ_16K, "mid": L2VQ_16K, "high": L2VQ_16K},
                        {"mid": ("dinov2", 384), "high": ("clip", 768)})
