"""vqlc_jax: large-codebook image tokenizers (VQGAN-LC and its baselines) in JAX/Flax."""

from vqlc_jax.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
