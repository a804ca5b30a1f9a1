"""A codebook for unlabeled faces: CLIP ViT-L/14 patch features of FFHQ, one global k-means -> 100,000 x 768.

    python -m vqlc_jax.codebook.build --config configs/codebook/ffhq_clip_vitl14.py --workdir DIR \
        --config.extractor.checkpoint=/data/clip-vit-large-patch14 --config.data.options.root=/data/ffhq

Images: a folder source, `root/train/*.png` (no class folders; sorted file names fix the row order). Features as
imagenet_clip_vitl14.py (224 px, pool 4: 16 vectors per image): 70,000 images -> 1.12M rows x 768 (~11 rows per
centre at k=100,000; `--config.codebook.k` for a smaller codebook). The checkpoint and root are placeholders.
"""

from vqlc_jax.codebook.build import base_config

CHECKPOINT_PLACEHOLDER = "/path/to/clip-vit-large-patch14"


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/codebook/ffhq_clip_vitl14.py: unknown variant {arg!r} (it has none)")
    c = base_config()
    c.data.update(name="folder", split="train", options={"root": "/path/to/ffhq"}, resolution=224)
    c.extractor.update(name="clip", checkpoint=CHECKPOINT_PLACEHOLDER, pool=4)
    c.extract.update(global_batch_size=256, images_per_shard=10_240)
    # 1.12M x 768 float32 = 3.4 GB: kept in memory; random-row init (kmeans++ is sequential in k).
    c.codebook.update(mode="global", k=100_000, max_resident_gb=4.0)
    c.kmeans.update(batch_size=16_384, num_steps=2_000, init="random")
    return c.lock()
