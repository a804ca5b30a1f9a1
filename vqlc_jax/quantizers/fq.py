"""FQGAN's factorized quantization (Bai et al., 2024): `fq`, k sub-quantizers over a split latent (the release's
sub-quantizer is `l2vq`, `vqlc_jax.quantizers.l2vq`).

`fq` holds one sub-quantizer per branch, any of the registry (`l2vq` as the release, or `lc` with its own frozen
codebook and projector, ...), each an attribute named after its branch (`quantizer/<branch>/embedding`). Latents are
the branches' pre-quantization latents concatenated on channels in branch order, [..., k * embed_dim]; tokens are
int32 [B, k, ...] (the sub-codebook axis right after the batch); the codes come back concatenated like the latents.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlc_jax.quantizers.registry import QUANTIZERS, make_quantizer

Array = jax.Array
BRANCH_KEYS = ("name", "quantizer")
FILLS = ("mean", "zero")


def branch_specs(branches: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, dict], ...]:
    """((name, quantizer options), ...) from `[{'name': 'vis', 'quantizer': {'name': 'l2vq', ...}}, ...]`, checked."""
    if len(branches) < 1:
        raise ValueError("fq quantizer: `branches` is empty; give one {'name', 'quantizer'} entry per sub-codebook")
    specs, seen = [], set()
    for i, branch in enumerate(branches):
        branch = dict(branch)
        if sorted(branch) != sorted(BRANCH_KEYS):
            raise ValueError(f"fq quantizer: branch {i} has keys {sorted(branch)}, expected {list(BRANCH_KEYS)}")
        name = str(branch["name"])
        if not name.isidentifier() or name.startswith("_") or name in seen:
            raise ValueError(f"fq quantizer: branch {i} name {name!r} must be a new identifier without a leading _")
        seen.add(name)
        options = dict(branch["quantizer"])
        if "name" not in options or "num_codes" not in options:
            raise ValueError(f"fq quantizer: branch {name!r}: its quantizer needs `name` and `num_codes`, got "
                             f"{sorted(options)}")
        specs.append((name, options))
    return tuple(specs)


class FQQuantizer(nn.Module):
    """k sub-quantizers over the channel blocks of z: `zq, indices, aux = fq(z, train=False)`.

    z [..., k * embed_dim] -> zq like z, indices int32 [B, k, ...], aux {'quant_loss': the sum over branches,
    'squared_distances' [B, k, ...], 'branches': {name: that sub-quantizer's aux}}. `branches` lists
    `{'name': ..., 'quantizer': {'name': <registry name>, 'num_codes': N, ...}}` in token order.
    """

    embed_dim: int
    branches: Sequence[Mapping[str, Any]]

    def setup(self) -> None:

        for name, options in branch_specs(self.branches):
            if hasattr(self, name):
                raise ValueError(f"fq quantizer: branch name {name!r} clashes with a module attribute")
            options = dict(options)
            setattr(self, name, make_quantizer(options.pop("name"), embed_dim=self.embed_dim, **options))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in branch_specs(self.branches))

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return tuple(int(options["num_codes"]) for _, options in branch_specs(self.branches))

    def sub_quantizers(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.names]

    def split(self, z: Array) -> list[Array]:
        """[..., k * embed_dim] -> k arrays [..., embed_dim], in branch order."""
        k = len(self.names)
        if z.shape[-1] != k * self.embed_dim:
            raise ValueError(f"fq quantizer: latents have {z.shape[-1]} channels, expected {k} branches x "
                             f"embed_dim {self.embed_dim} = {k * self.embed_dim} (shape {z.shape})")
        return jnp.split(z, k, axis=-1)

    def __call__(self, z: Array, train: bool = False) -> tuple[Array, Array, dict[str, Any]]:
        outputs = [q(zi, train=train) for q, zi in zip(self.sub_quantizers(), self.split(z))]
        zq = jnp.concatenate([o[0] for o in outputs], axis=-1)
        indices = jnp.stack([o[1] for o in outputs], axis=1)
        aux = {"quant_loss": sum(o[2]["quant_loss"] for o in outputs),
               "squared_distances": jnp.stack([o[2]["squared_distances"] for o in outputs], axis=1),
               "branches": {name: o[2] for name, o in zip(self.names, outputs)}}
        return zq, indices, aux

    def embed(self, indices: Array, keep: Sequence[bool] | None = None, fill: str = "mean") -> Array:
        """Tokens [B, k, ...] -> codes [B, ..., k * embed_dim]. With `keep` (one flag per branch), the codes of the
        branches left out are replaced by `fill`: 'mean', the mean of that codebook (in latent space: the
        expected code under uniform use, which the linear post_quant_conv maps to its expected output), or 'zero'."""
        keep = (True,) * len(self.names) if keep is None else tuple(bool(k) for k in keep)
        if len(keep) != len(self.names) or not any(keep) or fill not in FILLS:
            raise ValueError(f"fq quantizer: keep needs {len(self.names)} flags, at least one set, and fill one of "
                             f"{FILLS}; got keep={keep}, fill={fill!r}")
        if indices.ndim < 2 or indices.shape[1] != len(self.names):
            raise ValueError(f"fq quantizer: tokens must be [B, {len(self.names)}, ...], got shape {indices.shape}")
        codes = []
        for i, (q, kept) in enumerate(zip(self.sub_quantizers(), keep)):
            if kept:
                codes.append(q.embed(indices[:, i]))
                continue
            value = jnp.mean(q.codebook_vectors(), axis=0) if fill == "mean" else jnp.zeros(self.embed_dim)
            codes.append(jnp.broadcast_to(value, (*indices[:, i].shape, self.embed_dim)))
        return jnp.concatenate(codes, axis=-1)

    def codebook_vectors(self) -> list[Array]:
        """Each branch's effective codebook [num_codes, embed_dim]."""
        return [q.codebook_vectors() for q in self.sub_quantizers()]


# fq builds its branches from the registry, so it registers itself above the quantizers it composes.
QUANTIZERS["fq"] = FQQuantizer
