"""The public tokenizer: images in [-1, 1] (NHWC float) <-> int32 tokens [B, h, w].

    tok = Tokenizer.load("tokenizer_dir")          # or Tokenizer.from_official_checkpoint(path, ddconfig)
    tokens = tok.encode(images)                    # int32 [B, h, w]
    images = tok.decode(tokens)                    # float32 [B, H, W, 3], roughly in [-1, 1]
    recon, tokens, aux = tok.reconstruct(images)   # aux["quant_loss"], aux["z"], ...

A factorized (FQGAN, quantizer `fq`) tokenizer has `num_codebooks` k > 1 sub-codebooks: its tokens are int32
[B, k, h, w] in the config's branch order, and `decode(tokens, codebooks=("sem",))` decodes from a subset.
Every call is jit-compiled (one compilation per input shape) and checks its input first.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from vqlc_jax import export
from vqlc_jax.models.build import build_model, dummy_images
from vqlc_jax.models.vqgan import VQModel
from vqlc_jax.quantizers import FQQuantizer
from vqlc_jax.quantizers.utilization import out_of_range

CONFIG_FILE = "tokenizer.json"
VARIABLES_DIR = "variables"
# Inputs beyond this magnitude are taken for the wrong range (e.g. [0, 255]) rather than for [-1, 1].
MAX_ABS_INPUT = 1.5


# Where the `lc` quantizer keeps its frozen codebook: (collection, module, variable).
LC_CODEBOOK_PATH = ("codebook", "quantizer", "embedding")


class Tokenizer:
    """A VQGAN-family tokenizer: a Flax `VQModel` built from `config` plus its variables."""

    def __init__(self, config: Mapping[str, Any], variables: Mapping[str, Any]):
        self.config = ml_collections.ConfigDict(dict(config))
        self.model: VQModel = build_model(self.config)
        self.variables = jax.tree.map(jnp.asarray, dict(variables))
        self._apply = jax.jit(lambda v, x: self.model.apply(v, x))
        self._tokenize = jax.jit(lambda v, x: self.model.apply(v, x, method="tokenize"))
        self._decode = jax.jit(lambda v, i, options: self.model.apply(v, i, *options, method="decode_indices"),
                               static_argnums=2)
        self._quantize_latents = jax.jit(lambda v, z: self.model.apply(v, z, method="quantize_latents"))
        self._decode_latents = jax.jit(
            lambda v, z, quantize: self.model.apply(v, z, quantize, method="decode_latents"), static_argnums=2)

    # ----------------------------------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, config: Mapping[str, Any], *, seed: int = 0, codebook=None):
        """A freshly initialised tokenizer; `codebook` (array or `.npy`/`.pth` path) fills the frozen `lc` codebook
        ({branch: codebook} for the `lc` branches of an `fq` tokenizer)."""
        dummy = dummy_images(config)
        variables = dict(jax.jit(build_model(config).init)(jax.random.key(seed), jnp.zeros(dummy.shape)))
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

        converted = load_official_checkpoint(path_or_state_dict, ddconfig, **quantizer_options)
        return cls(converted.config, converted.variables)

    # ----------------------------------------------------------------------------------------------------------------
    # Properties
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ddconfig.ch_mult) - 1)

    @property
    def is_factorized(self) -> bool:
        """True for an FQGAN (`fq`) tokenizer: k sub-codebooks, tokens [B, k, h, w]."""
        return isinstance(self.model.quantizer, FQQuantizer)

    @property
    def num_codebooks(self) -> int:
        """k, the number of sub-codebooks (1 for a single-codebook tokenizer)."""
        return len(self.codebook_sizes)

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        """The size of each (sub-)codebook, in token order."""
        if self.is_factorized:
            return self.model.quantizer.codebook_sizes
        return (int(self.config.quantizer.num_codes),)

    @property
    def codebook_names(self) -> tuple[str, ...]:
        """The sub-codebooks' branch names (an `fq` tokenizer; () otherwise)."""
        return self.model.quantizer.names if self.is_factorized else ()

    @property
    def num_codes(self) -> int:
        """The codebook size of a single-codebook tokenizer (an `fq` one has `codebook_sizes`)."""
        if self.is_factorized:
            raise ValueError(f"a factorized tokenizer has {self.num_codebooks} codebooks of sizes "
                             f"{self.codebook_sizes}: use codebook_sizes")
        return self.codebook_sizes[0]

    @property
    def latent_dim(self) -> int:
        """Channels of the pre-quantization latents (k * embed_dim for an `fq` tokenizer)."""
        return int(self.config.embed_dim) * self.num_codebooks

    @property
    def in_channels(self) -> int:
        return int(self.config.ddconfig.get("in_channels", 3))

    # ----------------------------------------------------------------------------------------------------------------
    # Encode / decode
    # ----------------------------------------------------------------------------------------------------------------
    def encode(self, images) -> jax.Array:
        """Images [B, H, W, C] in [-1, 1] -> int32 tokens [B, H/f, W/f] ([B, k, H/f, W/f] when factorized)."""
        return self._tokenize(self.variables, self._check_images(images))

    def decode(self, indices, *, codebooks=None, fill: str = "mean") -> jax.Array:
        """int32 tokens [B, h, w] ([B, k, h, w] when factorized) -> images [B, h*f, w*f, C].

        Factorized only: `codebooks` (branch names or positions) decodes from those sub-codebooks alone; the codes
        of the others are replaced by their codebook's mean (`fill='mean'`: the expected code under uniform use) or
        by zeros (`fill='zero'`), and their tokens are ignored (any value in range)."""
        indices = self._check_indices(indices)
        if not self.is_factorized:
            if codebooks is not None or fill != "mean":
                raise ValueError("decode: `codebooks` and `fill` need a factorized (fq) tokenizer; this one has one "
                                 "codebook")
            return self._decode(self.variables, indices, ())
        keep = None if codebooks is None else self._keep_flags(codebooks)
        return self._decode(self.variables, indices, (keep, fill))

    def quantize_latents(self, latents) -> jax.Array:
        """Pre-quantization latents [B, h, w, latent_dim] -> int32 tokens as `encode` gives them (nearest codes)."""
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
        abstract = jax.eval_shape(build_model(config).init, jax.random.key(0), dummy_images(config))
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

    def _keep_flags(self, codebooks) -> tuple[bool, ...]:
        names = self.codebook_names
        if isinstance(codebooks, (str, int)):
            codebooks = [codebooks]
        chosen = {names.index(c) if c in names else c for c in codebooks}
        bad = sorted(str(c) for c in chosen if not (isinstance(c, int) and 0 <= c < len(names)))
        if bad or not chosen:
            raise ValueError(f"decode: codebooks {list(codebooks)} must be a non-empty choice of the names {names} "
                             f"or positions 0..{len(names) - 1}; unknown: {bad}")
        return tuple(i in chosen for i in range(len(names)))

    def _check_latents(self, latents) -> jax.Array:
        shape, d = tuple(np.shape(latents)), self.latent_dim
        if len(shape) != 4 or shape[-1] != d:
            raise ValueError(f"latents: expected [B, h, w, {d}] ({self.num_codebooks} x embed_dim "
                             f"{self.config.embed_dim}), got shape {shape}")
        latents = jnp.asarray(latents, jnp.float32)
        if not bool(jnp.isfinite(latents).all()):
            raise ValueError("latents: contain NaN or Inf")
        return latents

    def _check_indices(self, indices) -> jax.Array:
        shape, k = tuple(np.shape(indices)), self.num_codebooks
        layout = f"[B, {k}, h, w]" if self.is_factorized else "[B, h, w]"
        if len(shape) != (4 if self.is_factorized else 3) or (self.is_factorized and shape[1] != k):
            raise ValueError(f"indices: expected {layout}, got shape {shape}")
        dtype = np.dtype(getattr(indices, "dtype", np.asarray(indices).dtype))
        if not np.issubdtype(dtype, np.integer):
            raise ValueError(f"indices: expected integers, got dtype {dtype}")
        indices = jnp.asarray(indices, jnp.int32)
        bad = out_of_range(indices, self.codebook_sizes)
        if bad is not None:
            i, lo, hi = bad
            where = f" of sub-codebook {i} ({self.codebook_names[i]})" if self.is_factorized else ""
            raise ValueError(f"indices: values{where} span [{lo}, {hi}], outside [0, {self.codebook_sizes[i] - 1}]")
        return indices


def _with_codebook(variables: dict, codebook) -> dict:
    """`variables` with the frozen `lc` codebook replaced by `codebook` (an array or a `.npy`/`.pth` file); for an
    `fq` tokenizer a mapping {branch: codebook} fills those `lc` branches. Each is checked against its shape."""
    from vqlc_jax.quantizers import load_codebook

    collection, module, name = LC_CODEBOOK_PATH
    flat = traverse_util.flatten_dict(dict(variables))
    for branch, value in codebook.items() if isinstance(codebook, Mapping) else [(None, codebook)]:
        key = (collection, module, *([branch] if branch is not None else []), name)
        if key not in flat:
            raise ValueError(f"codebook given for {'/'.join(key[1:-1])}, but it has no frozen codebook (only `lc` "
                             "has one)")
        if isinstance(value, (str, pathlib.Path)):
            value = load_codebook(value, expected_dim=flat[key].shape[1])
        value = np.asarray(value, np.float32)
        if value.shape != tuple(flat[key].shape):
            raise ValueError(f"codebook: shape {value.shape}, the quantizer expects {tuple(flat[key].shape)}")
        flat[key] = jnp.asarray(value)
    return traverse_util.unflatten_dict(flat)


def from_official_fqgan(source, config: Mapping[str, Any] | None = None, **options) -> Tokenizer:
    """A `Tokenizer` from a released FQGAN checkpoint (`load_official("fqgan", ...)`); see
    `vqlc_jax.convert.official_fqgan.load_official_fqgan` for `config` and `options`."""
    from vqlc_jax.convert.official_fqgan import load_official_fqgan

    return Tokenizer(*load_official_fqgan(source, config, **options))
