"""VQGAN-LC: a frozen large codebook (CLIP-feature k-means centres) mapped into latent space by a trained projector.

The codebook [num_codes, codebook_dim] lives in the non-trainable collection `'codebook'` (variable `embedding`):
it is a jit argument (shardable) that gradients never update. The default init is Gaussian (the paper's "random
codebook" ablation); the real codebook comes from `load_codebook`. The projector lives in `params`:
  - `linear`: Dense `codebook_projection` (codebook_dim -> embed_dim); kernel ~ N(0, embed_dim^-1/2) as the
    release, bias ~ U(+-codebook_dim^-1/2) (torch's default, which the release leaves in place).
  - `mlp`: Dense `codebook_projection_0` (codebook_dim -> hidden_dim), ReLU, Dense `codebook_projection_2`
    (-> embed_dim), both with torch's default init as the release.
Module names match the torch keys (`codebook_projection.weight`, `codebook_projection.0.weight`, ...) under
`vqlc_jax.convert.torch_layout.default_path`.

The search projects the whole codebook under stop_gradient; the codes that carry gradients are projected from the
selected rows only (same math), so the projector's gradient costs T rows instead of num_codes.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqlc_jax.quantizers.base import Quantizer, uniform_init
from vqlc_jax.sharded_ops import gather_rows

Array = jax.Array

PROJECTORS = ("linear", "mlp")
OFFICIAL_CODEBOOK_KEY = "tok_embeddings.weight"


def _torch_dense(features: int, fan_in: int, kernel_init: nn.initializers.Initializer | None = None) -> nn.Dense:
    """Dense in full f32 precision (no TF32/bf16 passes: it defines the searched codebook) with torch.nn.Linear's
    default init (kernel and bias U(+-fan_in^-1/2)) unless kernel_init is given."""
    bound = fan_in ** -0.5
    return nn.Dense(features, kernel_init=kernel_init or uniform_init(bound), bias_init=uniform_init(bound),
                    precision=jax.lax.Precision.HIGHEST)


class LCQuantizer(Quantizer):
    """VQGAN-LC quantizer; see the module docstring."""

    codebook_dim: int = 768
    projector: str = "linear"
    hidden_dim: int = 256

    def __post_init__(self) -> None:
        if self.projector not in PROJECTORS:
            raise ValueError(f"LCQuantizer: unknown projector {self.projector!r}; choices: {', '.join(PROJECTORS)}")
        super().__post_init__()

    def setup(self) -> None:
        self.codebook = self.variable(
            "codebook", "embedding",
            lambda: jax.random.normal(self.make_rng("params"), (self.num_codes, self.codebook_dim), jnp.float32))
        if self.projector == "linear":
            self.codebook_projection = _torch_dense(
                self.embed_dim, self.codebook_dim, nn.initializers.normal(stddev=self.embed_dim ** -0.5))
        else:
            self.codebook_projection_0 = _torch_dense(self.hidden_dim, self.codebook_dim)
            self.codebook_projection_2 = _torch_dense(self.embed_dim, self.hidden_dim)

    def project(self, codes: Array) -> Array:
        """Codebook rows [..., codebook_dim] -> latent space [..., embed_dim]."""
        if self.projector == "linear":
            return self.codebook_projection(codes)
        return self.codebook_projection_2(nn.relu(self.codebook_projection_0(codes)))

    def search_table(self) -> Array:
        return self.project(self.codebook.value)

    def lookup(self, indices: Array) -> Array:
        return self.project(gather_rows(self.codebook.value, indices))


def load_codebook(path: str | pathlib.Path, *, expected_dim: int | None = None) -> np.ndarray:
    """A codebook float32 [N, Dc] from `.npy`, or `.pth`/`.pt`: a plain tensor, a state dict, or an official
    checkpoint `{'model': state_dict}` (key `tok_embeddings.weight`). Raises ValueError naming the file and problem."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    elif suffix in (".pth", ".pt"):
        from vqlc_jax.convert.torch_file import load_torch_file

        array = load_torch_file(path)
        if isinstance(array, Mapping):
            state = array.get("model", array)
            if not isinstance(state, Mapping) or OFFICIAL_CODEBOOK_KEY not in state:
                raise ValueError(f"codebook file {path}: no {OFFICIAL_CODEBOOK_KEY!r} in the state dict "
                                 f"(top-level keys: {sorted(map(str, array))[:10]})")
            array = state[OFFICIAL_CODEBOOK_KEY]
    else:
        raise ValueError(f"codebook file {path}: unsupported extension {path.suffix!r} (use .npy, .pth or .pt)")
    try:
        array = np.asarray(array, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"codebook file {path}: not a numeric array ({type(array).__name__}): {err}") from None
    if array.ndim != 2:
        raise ValueError(f"codebook file {path}: expected a 2-D array [N, Dc], got shape {array.shape}")
    if expected_dim is not None and array.shape[1] != expected_dim:
        raise ValueError(f"codebook file {path}: codebook dim {array.shape[1]} != expected {expected_dim}")
    return array
