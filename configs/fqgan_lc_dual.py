"""FQGAN-Dual with VQGAN-LC branches (no published codebase has this): each sub-codebook is a frozen k-means
codebook of CLIP ViT-L/14 patch features (`configs/codebook/imagenet_clip_vitl14.py`, 768-d) with its own trained
linear projector to dim 8 (`lc` quantizer), 16,384 codes per branch (`:100k`: 100,000, the paper's VQGAN-LC size);
the semantic branch keeps FQGAN's CLIP teacher, and the rest is FQGAN's recipe (`fqgan_config`).

    python -m vqlc_jax.main --config configs/fqgan_lc_dual.py --workdir /ckpt/fqgan_lc_dual \
        --config.codebook_paths.vis=/data/codebooks/clip16k_a/codebook.npy \
        --config.codebook_paths.sem=/data/codebooks/clip16k_b/codebook.npy \
        --config.loss.teachers.sem.path=/weights/clip-vit-large-patch14 \
        --config.data.options.data_dir=/data/tfds --config.loss.lpips_path=/data/weights/lpips_vgg.npz

The two codebooks may be one file (the projectors differ) or two k-means runs (other seeds or CLIP layers).
"""

from vqlc_jax.train.config import fqgan_config


def get_config(arg: str | None = None):
    if arg not in (None, "100k"):
        raise ValueError(f"configs/fqgan_lc_dual.py: unknown variant {arg!r} (choices: 100k)")
    lc = dict(name="lc", num_codes=100_000 if arg else 16_384, codebook_dim=768, projector="linear", alpha=1.0,
              beta=0.33, chunk_size=16_384)
    c = fqgan_config({"vis": lc, "sem": dict(lc)}, {"sem": ("clip", 1024)})
    c.codebook_paths = {"vis": "", "sem": ""}
    return c
