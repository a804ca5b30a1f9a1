"""FQGAN (factorized quantization): parity with the official release (`official_fqgan/fqgan_dual_tiny`), the
checkpoint loader's errors, the Tokenizer API for k sub-codebooks (tokens [B, k, h, w], subset decoding), the pure
losses, a fresh tokenizer with an `lc` branch, and per-sub-codebook utilization."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import relative_error
from flax.traverse_util import flatten_dict

from vqlc_jax import Tokenizer, evaluate, losses, parallel
from vqlc_jax.convert.official import read_state_dict
from vqlc_jax.convert.official_fqgan import infer_fqgan_config
from vqlc_jax.convert.torch_layout import CheckpointMismatchError
from vqlc_jax.generators import load_official
from vqlc_jax.quantizers import code_counts, make_quantizer
from vqlc_jax.tokenizer import from_official_fqgan

TOL = 1e-5
HEADS = dict(adapter_heads=2, feat_heads=4)  # the fixture's tiny attention (not in the weights)


def assert_same_variables(a: Tokenizer, b: Tokenizer) -> None:
    flat_a, flat_b = flatten_dict(a.variables), flatten_dict(b.variables)
    assert sorted(flat_a) == sorted(flat_b)
    for path, value in flat_a.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[path]), err_msg="/".join(path))


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    """The fixture's arrays (images and feature maps NHWC) and the paths of its files."""
    root = fixtures_dir / "official_fqgan"
    with np.load(root / "fqgan_dual_tiny.npz") as data:
        arrays = {k: data[k] for k in data.files if not k.startswith("state_dict/")}
    nhwc = {k: v.transpose(0, 2, 3, 1) for k, v in arrays.items() if v.ndim == 4}
    return {**arrays, **nhwc, "pth": root / "fqgan_dual_tiny.pth", "npz": root / "fqgan_dual_tiny.npz"}


@pytest.fixture(scope="module")
def tok(ref):
    return load_official("fqgan", ref["pth"], **HEADS)


@pytest.fixture(scope="module")
def forward(tok, ref):
    """(recon, tokens, aux, intermediates) of one jitted forward, capturing the trunk's and adapters' outputs."""
    capture = lambda mdl, method: method == "__call__" and mdl.name in ("encoder", "adapter")  # noqa: E731
    run = jax.jit(lambda v, x: tok.model.apply(v, x, capture_intermediates=capture, mutable=["intermediates"]))
    (recon, tokens, aux), state = run(tok.variables, ref["input"])
    return recon, tokens, aux, state["intermediates"]


def test_parity_with_the_release(tok, ref, forward):
    recon, tokens, aux, inter = forward
    b = aux["branches"]
    semantic = losses.info_nce_loss(b["sem"]["semantic_feat"][:, 0], ref["teacher_clip_cls"][:, 0])
    disentangle = 0.1 * aux["disentangle_loss"]
    got = {
        "encoder_trunk": inter["encoder"]["__call__"][0],
        "reconstruction": recon,
        "reconstruction_from_indices": tok.decode(tokens),
        "quant": jnp.concatenate([b["vis"]["zq"], b["sem"]["zq"]], axis=-1),
        "semantic_feat": b["sem"]["semantic_feat"],
        "disentangle_loss": disentangle,
        "semantic_loss": semantic,
        "rec_loss_l2": losses.reconstruction_loss(ref["input"], recon, kind="l2"),
        "codebook_semantic_disentangle_loss": aux["quant_loss"] + 0.5 * semantic + disentangle,
    }
    for name in ("sem", "vis"):
        got[f"adapter_out_{name}"] = inter[f"heads_{name}"]["adapter"]["__call__"][0]
        got[f"prequant_{name}"] = b[name]["z"]
        got[f"quant_{name}"] = b[name]["zq"]
        for mine, theirs in (("codebook_loss", "vq_loss"), ("commitment_loss", "commit_loss"),
                             ("entropy_loss", "entropy_loss")):
            got[f"{theirs}_{name}"] = b[name][mine]
    errors = {k: relative_error(v, ref[k]) for k, v in got.items()}
    for k, e in errors.items():
        print(f"fqgan parity {k:36s} {e:.2e}")
    assert max(errors.values()) < TOL, errors
    # Tokens: [B, k, h, w] with the visual sub-codebook first, identical to the release's argmin.
    assert tokens.shape == (2, 2, 16, 16) and tokens.dtype == jnp.int32
    for i, name in enumerate(("vis", "sem")):
        np.testing.assert_array_equal(np.asarray(tokens[:, i]).reshape(2, -1), ref[f"indices_{name}"])
        np.testing.assert_array_equal(b[name]["indices"], tokens[:, i])
    np.testing.assert_array_equal(tok.encode(ref["input"]), tokens)
    np.testing.assert_allclose(tok.reconstruct(ref["input"])[0], recon, rtol=0, atol=1e-6)


def test_sources_agree_and_the_config_is_read_off_the_weights(tok, ref):
    from_npz = from_official_fqgan(ref["npz"], **HEADS)
    assert_same_variables(tok, from_npz)
    config = tok.config.to_dict()
    assert config["ddconfig"]["ch_mult"] == [2, 1] and config["ddconfig"]["resolution"] == 32
    assert config["fq"] == {"adapter_layers": 2, "adapter_heads": 2,
                            "feat_heads": {"sem": {"width": 48, "num_layers": 2, "num_heads": 4}}}
    assert tok.num_codebooks == 2 and tok.codebook_sizes == (64, 64) and tok.codebook_names == ("vis", "sem")


def test_mismatches_are_listed_in_one_error(ref):
    state = read_state_dict(ref["npz"])
    config = infer_fqgan_config(state, "x", **HEADS)
    config["quantizer"]["branches"].append({"name": "sem_mid", "quantizer": {"name": "l2vq", "num_codes": 64}})
    broken = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    broken["quantize_sem.embedding.weight"] = np.zeros((64, 4), np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        from_official_fqgan(broken, config)
    message = str(err.value)
    for expected in ("the checkpoint has 2 sub-codebooks ['vis', 'sem'], the config 3",
                     "missing", "params/decoder/conv_out/bias", "params/quantizer/sem_mid/embedding",
                     "quantize_sem.embedding.weight: (64, 4)", "post_quant_conv.weight"):
        assert expected in message, message
    with pytest.raises(CheckpointMismatchError, match="sub-quantizers"):
        from_official_fqgan({k: v for k, v in state.items() if not k.startswith("quantize_")})


def test_tokens_are_checked_per_sub_codebook(tok, forward):
    tokens = np.asarray(forward[1])
    with pytest.raises(ValueError, match=r"expected \[B, 2, h, w\]"):
        tok.decode(tokens[:, 0])
    bad = tokens.copy()
    bad[0, 1, 0, 0] = 64
    with pytest.raises(ValueError, match=r"sub-codebook 1 \(sem\) span \[\d+, 64\], outside \[0, 63\]"):
        tok.decode(bad)
    with pytest.raises(ValueError, match="use codebook_sizes"):
        tok.num_codes
    with pytest.raises(ValueError, match="unknown: \\['txt'\\]"):
        tok.decode(tokens, codebooks=["txt"])


def test_decoding_from_one_sub_codebook(tok, forward):
    """Figure 3 of the paper: the other sub-codebook's codes are replaced by its codebook mean (or zeros)."""
    recon, tokens, aux, _ = forward
    vis_table, sem_table = tok.model.apply(tok.variables, method=lambda m: m.quantizer.codebook_vectors())
    sem = np.asarray(aux["branches"]["sem"]["zq"])
    for fill, vis in (("mean", np.mean(vis_table, axis=0)), ("zero", np.zeros(vis_table.shape[1]))):
        want = tok.decode_latents(np.concatenate([np.broadcast_to(vis, sem.shape), sem], -1), quantize=False)
        got = tok.decode(tokens, codebooks=("sem",), fill=fill)
        assert relative_error(got, want) < TOL
        assert relative_error(got, recon) > 0.01  # the visual codes mattered
    np.testing.assert_array_equal(tok.decode(tokens, codebooks=[1]), tok.decode(tokens, codebooks=["sem"]))


def test_losses_are_pure_and_cut_the_teacher():
    rng = np.random.default_rng(0)
    s, t = (jnp.asarray(rng.standard_normal((4, 8)), jnp.float32) for _ in range(2))
    grads = jax.jit(jax.grad(losses.info_nce_loss, argnums=(0, 1)))(s, t)
    assert float(jnp.abs(grads[0]).max()) > 0 and float(jnp.abs(grads[1]).max()) == 0
    logits = np.asarray(s / jnp.linalg.norm(s, axis=1, keepdims=True) @ (t / jnp.linalg.norm(t, axis=1,
                                                                                             keepdims=True)).T)
    want = -np.mean(np.diag(logits) - np.log(np.exp(logits).sum(1)))
    np.testing.assert_allclose(losses.info_nce_loss(s, t), want, rtol=1e-6)
    e = jnp.eye(3)
    assert float(losses.disentanglement_loss([e[:1], e[1:2]])) == 0.0
    np.testing.assert_allclose(losses.disentanglement_loss([e[:1], 2 * e[:1]]), 1.0, rtol=1e-6)
    # Triple: the mean of the three pairs (1, 0, 0).
    np.testing.assert_allclose(losses.disentanglement_loss([e[:1], -e[:1], e[1:2]]), 1 / 3, rtol=1e-6)
    # Entropy: confident, spread assignments score low; one code for everything scores high.
    spread, collapsed = -10.0 * (1 - jnp.eye(4)), jnp.zeros((4, 4)).at[:, 0].set(1.0)
    assert float(losses.codebook_entropy_loss(spread)) < -1.0 < 0 < float(losses.codebook_entropy_loss(collapsed))


FRESH = {"ddconfig": dict(ch=32, ch_mult=[1], num_res_blocks=1, z_channels=8, resolution=16), "embed_dim": 4,
         "quantizer": {"name": "fq", "branches": [
             {"name": "vis", "quantizer": {"name": "l2vq", "num_codes": 32}},
             {"name": "sem", "quantizer": {"name": "lc", "num_codes": 16, "codebook_dim": 12}}]},
         "fq": {"adapter_layers": 1, "adapter_heads": 2, "feat_heads": {"sem": dict(width=16, num_layers=1,
                                                                                     num_heads=2)}}}


def test_an_lc_branch_keeps_its_frozen_codebook():
    fq = make_quantizer("fq", embed_dim=4, branches=FRESH["quantizer"]["branches"])
    z = jax.random.normal(jax.random.key(0), (2, 3, 3, 8))
    variables = jax.jit(fq.init)(jax.random.key(1), z)
    assert variables["codebook"]["sem"]["embedding"].shape == (16, 12)  # not in params: never trained
    assert "embedding" in variables["params"]["vis"] and "codebook_projection" in variables["params"]["sem"]
    zq, tokens, aux = jax.jit(fq.apply)(variables, z)
    assert tokens.shape == (2, 2, 3, 3) and int(tokens[:, 1].max()) < 16
    assert set(aux["branches"]) == {"vis", "sem"} and set(aux["branches"]["vis"]) >= {"entropy_loss", "quant_loss"}
    np.testing.assert_allclose(aux["quant_loss"], sum(b["quant_loss"] for b in aux["branches"].values()))
    embedded = jax.jit(lambda v, t: fq.apply(v, t, method="embed"))(variables, tokens)
    np.testing.assert_allclose(embedded, zq, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_fresh_tokenizer_with_an_lc_branch_trains_every_part_and_round_trips(tmp_path):
    codebook = np.random.default_rng(0).standard_normal((16, 12)).astype(np.float32)
    tok = Tokenizer.create(FRESH, seed=0, codebook={"sem": codebook})
    np.testing.assert_array_equal(tok.variables["codebook"]["quantizer"]["sem"]["embedding"], codebook)
    images = np.random.default_rng(1).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
    tokens = tok.encode(images)
    assert tokens.shape == (4, 2, 16, 16) and tok.codebook_sizes == (32, 16)
    assert tok.decode(tokens).shape == images.shape

    def loss(params):
        recon, _, aux = tok.model.apply({**tok.variables, "params": params}, images, train=True)
        teacher = jnp.asarray(np.random.default_rng(2).standard_normal((4, 16)), jnp.float32)
        return (jnp.mean((recon - images) ** 2) + aux["quant_loss"] + 0.1 * aux["disentangle_loss"]
                + 0.5 * losses.info_nce_loss(aux["branches"]["sem"]["semantic_feat"][:, 0], teacher))

    grads = flatten_dict(jax.jit(jax.grad(loss))(tok.variables["params"]))
    assert all(bool(jnp.isfinite(g).all()) for g in grads.values())
    for path in (("heads_sem", "adapter", "positional_embedding"), ("quantizer", "vis", "embedding"),
                 ("quantizer", "sem", "codebook_projection", "kernel"), ("feat_heads_sem", "class_embedding")):
        assert float(jnp.abs(grads[path]).max()) > 0, path
    tok.save(tmp_path / "fq")
    loaded = Tokenizer.load(tmp_path / "fq")
    assert loaded.config.to_dict() == tok.config.to_dict() and loaded.codebook_names == ("vis", "sem")
    assert_same_variables(tok, loaded)


def test_utilization_is_reported_per_sub_codebook(tok):
    from vqlc_jax import data as data_lib

    data = ml_collections.ConfigDict(dict(name="bundled", options={"resolution": 32}, resolution=32,
                                          eval_split="validation", eval_max_images=4))
    result = evaluate.evaluate_tokenizer(tok.model, tok.variables, data, num_codes=tok.codebook_sizes,
                                         batch_size=8, mesh=parallel.make_mesh(), codebook_names=tok.codebook_names)
    source = data_lib.Subset(data_lib.make_source(data.name, data.eval_split, data.options), 4)
    images = np.concatenate([b.image[b.mask] for b in data_lib.make_pipeline(
        source, resolution=32, global_batch_size=4, seed=0, train=False)])
    tokens = tok.encode(images)
    for i, (name, size) in enumerate(zip(tok.codebook_names, tok.codebook_sizes)):
        want = np.mean(np.asarray(code_counts(tokens[:, i], size)) > 0)
        assert result.scalars[f"utilization_{name}"] == pytest.approx(want)
    assert result.counts.shape == (128,) and result.counts.sum() == 2 * tokens[:, 0].size
