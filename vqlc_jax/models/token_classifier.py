"""Image classifier over a token map: one embedding per token, then the ViT of `models.vit` (as a patch-16 ViT over
its 256 patches, for a 16 x 16 map).

`TokenClassifier(num_codes, embedding, backbone=ViT(...))(tokens [B, h, w])` gives logits; `method=
TokenClassifier.embed` the [B, h*w, W] token embeddings (row-major) that the backbone reads. The token embedding
(`token_embed`, in place of the patch embedding) is either
- `"learned"`: a table over the `num_codes` codes (N(0, 0.02)), or
- `"codebook"`: a trained linear map (xavier-uniform) of each token's row of a frozen codebook, e.g. the tokenizer's
  CLIP-feature codebook (`lc`), held in the non-trainable collection `"codebook"` (variable `embedding`
  [num_codes, codebook_dim]): pass it with the params, `{"params": ..., "codebook": {"embedding": rows}}`; gradients
  never reach it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlc_jax.models.vit import ViT

Array = jax.Array
EMBEDDINGS = ("learned", "codebook")


class TokenClassifier(nn.Module):
    """Token map -> logits; see the module docstring. `codebook_dim` is used by the `"codebook"` embedding only."""

    num_codes: int
    embedding: str
    backbone: ViT
    codebook_dim: int = 0

    def setup(self):
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"TokenClassifier: embedding {self.embedding!r} is not one of {EMBEDDINGS}")
        width = self.backbone.width
        if self.embedding == "learned":
            self.token_embed = nn.Embed(self.num_codes, width, embedding_init=nn.initializers.normal(0.02))
        else:
            if self.codebook_dim <= 0:
                raise ValueError("TokenClassifier: the codebook embedding needs codebook_dim > 0")
            self.codebook = self.variable("codebook", "embedding", jnp.zeros, (self.num_codes, self.codebook_dim),
                                          jnp.float32)
            self.token_embed = nn.Dense(width, kernel_init=nn.initializers.xavier_uniform())

    def embed(self, tokens: Array) -> Array:
        """int [B, h, w] -> [B, h*w, W]."""
        if tokens.ndim != 3 or tokens.shape[1] * tokens.shape[2] != self.backbone.num_tokens:
            raise ValueError(f"TokenClassifier: expected token maps [B, h, w] with h*w = {self.backbone.num_tokens},"
                             f" got {tokens.shape}")
        flat = tokens.reshape(tokens.shape[0], -1)
        if self.embedding == "learned":
            return self.token_embed(flat)
        return self.token_embed(jnp.take(self.codebook.value, flat, axis=0))

    def pooled(self, tokens: Array, *, train: bool = False) -> Array:
        """[B, W]: the backbone's pooled features."""
        return self.backbone.pooled(self.embed(tokens), train=train)

    def __call__(self, tokens: Array, *, train: bool = False) -> Array:
        """Logits [B, num_classes]."""
        return self.backbone(self.embed(tokens), train=train)
