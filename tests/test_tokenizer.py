"""The public Tokenizer: encode/decode/reconstruct, save/load round trip, input checks, all quantizers."""

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from vqlc_jax import Tokenizer

DDCONFIG = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=16, resolution=16,
                in_channels=3, out_ch=3, dropout=0.0, double_z=False)
NUM_CODES, CODE_DIM = 64, 12


def config(name="lc", **options):
    quantizer = {"name": name, "num_codes": NUM_CODES, **options}
    if name == "lc":
        quantizer.setdefault("codebook_dim", CODE_DIM)
    return {"ddconfig": DDCONFIG, "embed_dim": 4, "quantizer": quantizer}


@pytest.fixture(scope="module")
def codebook():
    return np.random.default_rng(0).standard_normal((NUM_CODES, CODE_DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def tok(codebook):
    return Tokenizer.create(config(), seed=1, codebook=codebook)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)


def test_encode_decode_reconstruct(tok, images, codebook):
    tokens = tok.encode(images)
    assert tokens.shape == (3, 8, 8) and tokens.dtype == np.int32
    assert 0 <= int(tokens.min()) and int(tokens.max()) < NUM_CODES
    recon, indices, aux = tok.reconstruct(images)
    assert recon.shape == images.shape
    np.testing.assert_array_equal(indices, tokens)
    np.testing.assert_allclose(tok.decode(tokens), recon, rtol=1e-5, atol=1e-5)
    assert float(aux["quant_loss"]) > 0
    # The codebook given at creation is the one in use, and any batch size works.
    np.testing.assert_array_equal(tok.variables["codebook"]["quantizer"]["embedding"], codebook)
    np.testing.assert_array_equal(tok.encode(images[:1]), tokens[:1])


def test_save_load_round_trip_is_exact(tok, images, tmp_path):
    tok.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.config.to_dict() == tok.config.to_dict()
    leaves = zip(*(sorted(flatten_dict(t.variables).items()) for t in (tok, loaded)))
    for (path_a, a), (path_b, b) in leaves:
        assert path_a == path_b
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(loaded.encode(images), tok.encode(images))


def test_save_refuses_to_overwrite(tok, tmp_path):
    tok.save(tmp_path / "tok")
    before = sorted(p.name for p in (tmp_path / "tok").iterdir())
    with pytest.raises(FileExistsError, match="already exists"):
        tok.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == before


def test_load_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((16, 16, 3), np.float32), "shape"),
    (np.zeros((1, 16, 16, 1), np.float32), "channels"),
    (np.zeros((1, 16, 16, 3), np.uint8), "dtype uint8"),
    (np.full((1, 16, 16, 3), 255.0, np.float32), "far outside"),
    (np.zeros((1, 15, 16, 3), np.float32), "not divisible"),
    (np.full((1, 16, 16, 3), np.nan, np.float32), "NaN"),
])
def test_bad_images_raise(tok, bad, message):
    with pytest.raises(ValueError, match=message):
        tok.encode(bad)


@pytest.mark.parametrize("bad, message", [
    (np.full((1, 8, 8), NUM_CODES, np.int32), "outside"),
    (np.full((1, 8, 8), -1, np.int32), "outside"),
    (np.zeros((1, 8, 8), np.float32), "integers"),
    (np.zeros((8, 8), np.int32), "shape"),
])
def test_bad_indices_raise(tok, bad, message):
    with pytest.raises(ValueError, match=message):
        tok.decode(bad)


def test_codebook_from_npy_file_is_checked(tmp_path, codebook):
    np.save(tmp_path / "cb.npy", codebook)
    tok = Tokenizer.create(config(), codebook=str(tmp_path / "cb.npy"))
    np.testing.assert_array_equal(tok.variables["codebook"]["quantizer"]["embedding"], codebook)
    np.save(tmp_path / "wide.npy", np.zeros((NUM_CODES, CODE_DIM + 1), np.float32))
    with pytest.raises(ValueError, match="wide.npy"):
        Tokenizer.create(config(), codebook=str(tmp_path / "wide.npy"))


@pytest.mark.parametrize("name", ["vq", "fc", "ema"])
def test_baseline_quantizers_tokenize(name, images):
    tok = Tokenizer.create(config(name))
    recon, tokens, aux = tok.reconstruct(images)
    assert recon.shape == images.shape and tokens.shape == (3, 8, 8)
    np.testing.assert_allclose(tok.decode(tokens), recon, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="only `lc`"):
        Tokenizer.create(config(name), codebook=np.zeros((NUM_CODES, CODE_DIM), np.float32))

