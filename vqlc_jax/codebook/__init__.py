"""The offline codebook pipeline: image features (Flax CLIP or raw pixel patches) -> shards -> k-means -> codebook.

    python -m vqlc_jax.codebook.build --config configs/codebook/demo.py --workdir DIR   # extract, then cluster
"""
