"""FQGAN-Dual at f8 (32x32 tokens per 256 px image): LlamaGen's VQ-8 trunk (ch_mult 1, 2, 2, 4; attention at 32),
otherwise `configs/fqgan_dual_f16.py` (2 x 16,384 codes, CLIP ViT-L/14 teacher on the semantic branch).

    python -m vqlc_jax.main --config configs/fqgan_dual_f8.py --workdir /ckpt/fqgan_dual_f8 \
        --config.loss.teachers.sem.path=/weights/clip-vit-large-patch14 \
        --config.data.options.data_dir=/data/tfds --config.loss.lpips_path=/data/weights/lpips_vgg.npz
"""

from vqlc_jax.train.config import L2VQ_16K, fqgan_config


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/fqgan_dual_f8.py: unknown variant {arg!r} (it has none)")
    c = fqgan_config({"vis": L2VQ_16K, "sem": L2VQ_16K}, {"sem": ("clip", 1024)})
    c.model.ddconfig.update(ch_mult=(1, 2, 2, 4), attn_resolutions=(32,))
    return c
