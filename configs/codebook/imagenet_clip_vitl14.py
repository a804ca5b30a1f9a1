"""The release's codebook: CLIP ViT-L/14 patch features of ImageNet-1k train, k-means -> 100,000 x 768.

    python -m vqlc_jax.codebook.build --config configs/codebook/imagenet_clip_vitl14.py --workdir DIR \
        --config.extractor.checkpoint=/data/clip-vit-large-patch14 --config.data.options.data_dir=/data/tfds

Features: openai/clip-vit-large-patch14 at 224 px, `post_layernorm` + `visual_projection` on every patch token
(16x16 x 768), 4x4 average-pooled: 16 vectors per image; 1,281,167 images -> 20.5M rows, 31.5 GB of float16 shards.
`extractor.checkpoint` is a local Hugging Face folder (config.json, model.safetensors, preprocessor_config.json;
`hf download openai/clip-vit-large-patch14 --local-dir ...` where there is internet): the placeholder below must be
replaced, a missing folder is an error naming it. ImageNet is read as prepared by `python -m vqlc_jax.data.imagenet`.
Clustering as the release: k=100 per class, the 1,000 classes concatenated in class-id order (100 vmapped per run).
Variant `:global`: one global k-means of all rows into 100,000 centres (the paper's description; for unlabeled
data use a folder source, see ffhq_clip_vitl14.py).
"""

from vqlc_jax.codebook.build import base_config

CHECKPOINT_PLACEHOLDER = "/path/to/clip-vit-large-patch14"


def get_config(arg: str | None = None):
    c = base_config()
    c.data.update(name="imagenet2012", split="train", options={"data_dir": "~/tensorflow_datasets"}, resolution=224)
    c.extractor.update(name="clip", checkpoint=CHECKPOINT_PLACEHOLDER, pool=4)
    c.extract.update(global_batch_size=256, images_per_shard=10_240)
    # Per class: ~20.8K rows per class, batches of 1,024 per class, 500 steps (~25 passes).
    c.codebook.update(mode="per_class", k=100)
    c.kmeans.update(batch_size=1024, num_steps=500, init="kmeans++", classes_per_run=100)
    if arg == "global":
        # kmeans++ over 100K centres is sequential in k: random rows as the release's init; ~16 passes.
        c.codebook.update(mode="global", k=100_000)
        c.kmeans.update(batch_size=16_384, num_steps=20_000, init="random", classes_per_run=0)
    elif arg:
        raise ValueError(f"configs/codebook/imagenet_clip_vitl14.py: unknown variant {arg!r} (choices: global)")
    return c.lock()
