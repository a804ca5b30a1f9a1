"""The public tokenizer: images in [-1, 1] (NHWC float) <-> int32 tokens [B, h, w].

    tok = Tokenizer.load("tokenizer_dir")          # or Tokenizer.from_official_checkpoint(path, ddconfig)
    tokens = tok.encode(images)                    # int32 [B, h, w]
    images = tok.decode(tokens)                    # float32 [B, H, W, 3], roughly in [-1, 1]
    recon, tokens, aux = tok.reconstruct(images)   # aux["quant_loss"], aux["z"], ...

Every call is jit-compiled (one compilation per input shape) and checks its input first.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from vqlc_jax import export
from vqlc_jax.models.vqgan import VQModel, build_vqgan

CONFIG_FILE = "tokenizer.json"
VARIABLES_DIR = "variables"
# Inputs beyond this magnitude are taken for the wrong range (e.g. [0, 255]) rather than for [-1, 1].
MAX_ABS_INPUT = 1.5


# Where the `lc` quantizer keeps its frozen codebook: (collection, module, variable).
LC_CODEBOOK_PATH = ("codebook", "quantizer", "embedding")


def _dummy_images(config: Mapping[str, Any]) -> jax.ShapeDtypeStruct:
    """One image of the configured resolution: what `init` needs to build the variables."""
    ddconfig = config["ddconfig"]
    res = int(ddconfig.get("resolution", 256))
    return jax.ShapeDtypeStruct((1, res, res, int(ddconfig.get("in_channels", 3))), jnp.float32)


class Tokenizer:
    """A VQGAN-family tokenizer: a Flax `VQModel` built from `config` plus its variables."""

    def __init__(self, config: Mapping[str, Any], variables: Mapping[str, Any]):
        self.config = ml_collections.ConfigDict(dict(config))
        self.model: VQModel = build_vqgan(self.config)
        self.variables = jax.tree.map(jnp.asarray, dict(variables))
        self._apply = jax.jit(lambda v, x: self.model.apply(v, x))
        self._tokenize = jax.jit(lambda v, x: self.model.apply(v, x, method=VQModel.tokenize))
        self._decode = jax.jit(lambda v, i: self.model.apply(v, i, method=VQModel.decode_indices))
        self._quantize_latents = jax.jit(lambda v, z: self.model.apply(v, z, method=VQModel.quantize_latents))
        self._decode_latents = jax.jit(
            lambda v, z, quantize: self.model.apply(v, z, quantize, method=VQModel.decode_latents),
            static_argnums=2)

    # ----------------------------------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, config: Mapping[str, Any], *, seed: int = 0, codebook: np.ndarray | str | None = None):
        """A freshly initialised tokenizer; `codebook` (array or `.npy`/`.pth` path) fills the frozen `lc` codebook."""
        dummy = _dummy_images(config)
        variables = dict(jax.jit(build_vqgan(config).init)(jax.random.key(seed), jnp.zeros(dummy.shape)))
        if codebook is not None:
            variables = _with_codebook(variables, codebook)
        return cls(config, variables)

    @classmethod
    def from_official_checkpoint(cls, path_or_state_dict, ddconfig: Mapping[str, Any], **quantizer_options):
        """Reads a released VQGAN-LC checkpoint (`.pth` or a dict of numpy arrays keyed by the official names).

        The quantizer (kind, N, codebook dim, projector) and D' are read off the weights; `quantizer_options`
        override or add options (e.g. `beta`, `chunk_size`). See `vqlc_jax.convert.official` for the
        discriminator and LPIPS weights of the same file.
        """
        from vqlc_jax.convert.official import load_official_checkpoint

        return load_official_checkpoint(path_or_state_dict, ddconfig, **quantizer_options).tokenizer

    # ----------------------------------------------------------------------------------------------------------------
    # Properties
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ddconfig.ch_mult) - 1)

    @property
    def num_codes(self) -> int:
        return int(self.config.quantizer.num_codes)

    @property
    def in_channels(self) -> int:
        return int(self.config.ddconfig.get("in_channels", 3))

    # ----------------------------------------------------------------------------------------------------------------
    # Encode / decode
    # ----------------------------------------------------------------------------------------------------------------
    def encode(self, images) -> jax.Array:
        """Images [B, H, W, C] in [-1, 1] -> int32 tokens [B, H/f, W/f]."""
        return self._tokenize(self.variables, self._check_images(images))

    def decode(self, indices) -> jax.Array:
        """int32 tokens [B, h, w] -> images [B, h*f, w*f, C]."""
        return self._decode(self.variables, self._check_indices(indices))

    def quantize_latents(self, latents) -> jax.Array:
        """Pre-quantization latents [B, h, w, D'] -> int32 tokens [B, h, w] (nearest codes)."""
        return self._quantize_latents(self.variables, self._check_latents(latents))

    def decode_latents(self, latents, *, quantize: bool = True) -> jax.Array:
        """Latents [B, h, w, D'] -> images: through the nearest codes (the release's way) or directly."""
        return self._decode_latents(self.variables, self._check_latents(latents), quantize)

    def reconstruct(self, images):
        """Images -> (reconstructions, tokens, aux); aux holds `quant_loss`, the latents `z` and search distances."""
        return self._apply(self.variables, self._check_images(images))

    # ----------------------------------------------------------------------------------------------------------------
    # Save / load
    # ----------------------------------------------------------------------------------------------------------------
    def save(self, directory: str | pathlib.Path) -> pathlib.Path:
        """Writes `tokenizer.json` (the config) and `variables/` (orbax) under `directory`; returns it.

        In a multi-process job every process calls it (orbax writes each array once); the directory must be shared.
        """
        return export.save(directory, self.variables, arrays_dir=VARIABLES_DIR, meta_file=CONFIG_FILE,
                           meta=self.config.to_dict())

    @classmethod
    def load(cls, directory: str | pathlib.Path) -> "Tokenizer":
        """Reads what `save` wrote."""
        config = export.read_meta(directory, CONFIG_FILE, "Tokenizer.save")
        abstract = jax.eval_shape(build_vqgan(config).init, jax.random.key(0), _dummy_images(config))
        return cls(config, export.restore(directory, VARIABLES_DIR, dict(abstract)))

    # ----------------------------------------------------------------------------------------------------------------
    # Input checks
    # ----------------------------------------------------------------------------------------------------------------
    def _check_images(self, images) -> jax.Array:
        shape = tuple(np.shape(images))
        if len(shape) != 4:
            raise ValueError(f"images: expected NHWC [B, H, W, {self.in_channels}], got shape {shape}")
        b, h, w, c = shape
        if c != self.in_channels:
            raise ValueError(f"images: expected {self.in_channels} channels (NHWC, last axis), got shape {shape}")
        if b == 0:
            raise ValueError("images: empty batch")
        dtype = np.dtype(getattr(images, "dtype", np.asarray(images).dtype))
        if not np.issubdtype(dtype, np.floating):
            raise ValueError(f"images: expected floats in [-1, 1], got dtype {dtype} (for uint8 use x / 127.5 - 1)")
        f = self.downsample_factor
        if h % f or w % f:
            raise ValueError(f"images: spatial size {h}x{w} is not divisible by the down-sampling factor {f}")
        images = jnp.asarray(images, jnp.float32)
        lo, hi = float(images.min()), float(images.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("images: contain NaN or Inf")
        if lo < -MAX_ABS_INPUT or hi > MAX_ABS_INPUT:
            raise ValueError(f"images: values span [{lo:g}, {hi:g}], far outside [-1, 1] (rescale the input)")
        return images

    def _check_latents(self, latents) -> jax.Array:
        shape, d = tuple(np.shape(latents)), int(self.config.embed_dim)
        if len(shape) != 4 or shape[-1] != d:
            raise ValueError(f"latents: expected [B, h, w, {d}] (embed_dim={d}), got shape {shape}")
        latents = jnp.asarray(latents, jnp.float32)
        if not bool(jnp.isfinite(latents).all()):
            raise ValueError("latents: contain NaN or Inf")
        return latents

    def _check_indices(self, indices) -> jax.Array:
        shape = tuple(np.shape(indices))
        if len(shape) != 3:
            raise ValueError(f"indices: expected [B, h, w], got shape {shape}")
        dtype = np.dtype(getattr(indices, "dtype", np.asarray(indices).dtype))
        if not np.issubdtype(dtype, np.integer):
            raise ValueError(f"indices: expected integers, got dtype {dtype}")
        indices = jnp.asarray(indices, jnp.int32)
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= self.num_codes:
            raise ValueError(f"indices: values span [{lo}, {hi}], outside [0, {self.num_codes - 1}]")
        return indices


def _with_codebook(variables: dict, codebook: np.ndarray | str) -> dict:
    """`variables` with the frozen `lc` codebook replaced by `codebook` (an array or a `.npy`/`.pth` file)."""
    from vqlc_jax.quantizers import load_codebook

    collection, module, name = LC_CODEBOOK_PATH
    current = variables.get(collection, {}).get(module, {}).get(name)
    if current is None:
        raise ValueError("codebook given, but the quantizer has no frozen codebook (only `lc` has one)")
    if isinstance(codebook, (str, pathlib.Path)):
        codebook = load_codebook(codebook, expected_dim=current.shape[1])
    codebook = np.asarray(codebook, np.float32)
    if codebook.shape != tuple(current.shape):
        raise ValueError(f"codebook: shape {codebook.shape}, the quantizer expects {tuple(current.shape)}")
    out = dict(variables)
    out[collection] = {**variables[collection], module: {**variables[collection][module], name: jnp.asarray(codebook)}}
    return out
