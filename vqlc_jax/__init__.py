"""vqlc_jax: large-codebook image tokenizers (VQGAN-LC and its baselines) in JAX/Flax."""
