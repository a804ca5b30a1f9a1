"""Official VQGAN-LC checkpoints: conversion errors, and numerical parity with the release on `tiny_linear`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

from vqlc_jax import Tokenizer
from vqlc_jax.convert.official import load_official_checkpoint
from vqlc_jax.convert.torch_layout import CheckpointMismatchError
from vqlc_jax.models.discriminator import NLayerDiscriminator
from vqlc_jax.models.lpips import LPIPS
from vqlc_jax.models.vqgan import VQModel

TOL = 1e-4


@pytest.fixture(scope="module")
def converted(official_tiny):
    """The fixture's state dict with the VGG16 trunk added, as a real released checkpoint carries it."""
    return load_official_checkpoint({**official_tiny["state_dict"], **official_tiny["vgg_trunk"]},
                                    official_tiny["ddconfig"])


def test_quantizer_is_read_off_the_weights(converted, official_tiny):
    q = Tokenizer(converted.config, converted.variables).config.quantizer
    assert (q.name, q.num_codes, q.codebook_dim, q.projector) == ("lc", 512, 32, "linear")
    assert Tokenizer(converted.config, converted.variables).config.embed_dim == 8
    assert converted.discriminator_layers == 2


def test_parity_with_the_release(converted, official_tiny):
    """All outputs within 1e-4 relative; `pytest -s -k parity` prints the measured errors."""
    tok = Tokenizer(converted.config, converted.variables)
    x = official_tiny["input"]
    recon, indices, aux = tok.reconstruct(x)
    np.testing.assert_array_equal(np.asarray(indices).reshape(2, -1), official_tiny["indices"])
    np.testing.assert_array_equal(tok.encode(x), indices)
    disc = NLayerDiscriminator(n_layers=converted.discriminator_layers)
    errors = {
        "encoded": relative_error(tok.model.apply(tok.variables, x, method=VQModel.encode), official_tiny["encoded"]),
        "projected_codebook": relative_error(
            tok.model.apply(tok.variables, method=lambda m: m.quantizer.codebook_vectors()),
            official_tiny["projected_codebook"]),
        "quant_loss": relative_error(aux["quant_loss"], official_tiny["quant_loss"]),
        "reconstruction": relative_error(recon, official_tiny["reconstruction"]),
        "decode(indices)": relative_error(tok.decode(indices), official_tiny["reconstruction"]),
        "disc_logits": relative_error(disc.apply(converted.discriminator, x), official_tiny["disc_logits"]),
        "lpips": relative_error(LPIPS().apply(converted.lpips, x, official_tiny["reconstruction"]),
                                official_tiny["lpips"]),
    }
    for name, error in errors.items():
        print(f"parity {name}: {error:.2e}")
    assert max(errors.values()) <= TOL, errors


def test_pth_file_reads_like_the_arrays(official_tiny, converted):
    from_pth = load_official_checkpoint(official_tiny["pth"], official_tiny["ddconfig"])
    assert from_pth.lpips is None  # the fixture's .pth carries no VGG16 trunk
    same = jax.tree.map(np.array_equal, from_pth.variables, converted.variables)
    assert jax.tree.all(same)
    tok = Tokenizer.from_official_checkpoint(official_tiny["pth"], official_tiny["ddconfig"], chunk_size=100)
    np.testing.assert_array_equal(np.asarray(tok.encode(official_tiny["input"])).reshape(2, -1),
                                  official_tiny["indices"])


@pytest.mark.parametrize("edit, expected", [
    (lambda sd: sd.pop("decoder.conv_out.bias"), r"missing \(1\): params/decoder/conv_out/bias"),
    (lambda sd: sd.__setitem__("encoder.extra.weight", np.zeros(3, np.float32)), "encoder.extra.weight"),
    (lambda sd: sd.__setitem__("quant_conv.bias", np.zeros(5, np.float32)), r"quant_conv.bias: \(5,\)"),
    (lambda sd: sd.__setitem__("ema_model.x", np.zeros(1, np.float32)), r"unknown keys \(1\): ema_model.x"),
])
def test_bad_state_dicts_name_the_keys(official_tiny, edit, expected):
    sd = dict(official_tiny["state_dict"])
    edit(sd)
    with pytest.raises(CheckpointMismatchError, match=expected):
        load_official_checkpoint(sd, official_tiny["ddconfig"])


def test_missing_file_is_named(tmp_path, official_tiny):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        Tokenizer.from_official_checkpoint(tmp_path / "nope.pth", official_tiny["ddconfig"])


def test_mlp_projector_is_recognised(official_tiny):
    sd = {k: v for k, v in official_tiny["state_dict"].items() if not k.startswith("codebook_projection")}
    rng = np.random.default_rng(0)
    sd["codebook_projection.0.weight"] = rng.standard_normal((256, 32), dtype=np.float32)
    sd["codebook_projection.0.bias"] = np.zeros(256, np.float32)
    sd["codebook_projection.2.weight"] = rng.standard_normal((8, 256), dtype=np.float32) * 0.05
    sd["codebook_projection.2.bias"] = np.zeros(8, np.float32)
    tok = Tokenizer.from_official_checkpoint(sd, official_tiny["ddconfig"])
    assert tok.config.quantizer.projector == "mlp"
    hidden = np.maximum(sd["tok_embeddings.weight"] @ sd["codebook_projection.0.weight"].T, 0)
    want = hidden @ sd["codebook_projection.2.weight"].T
    got = tok.model.apply(tok.variables, method=lambda m: m.quantizer.codebook_vectors())
    assert relative_error(got, want) <= 1e-5
    assert jnp.issubdtype(tok.encode(official_tiny["input"]).dtype, jnp.int32)
