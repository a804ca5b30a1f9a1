"""Quantizers (lc, vq, fc, ema), the quantization loss, utilization statistics, registry and codebook loading."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from vqlc_jax.convert.torch_layout import map_state_dict
from vqlc_jax.losses import quantization_loss
from vqlc_jax.quantizers import (
    QUANTIZERS, EMAQuantizer, FCQuantizer, LCQuantizer, VQQuantizer, code_counts, ema_update, load_codebook,
    make_quantizer, perplexity, utilization,
)
from vqlc_jax.quantizers.fc import l2_normalize

N, D, DC = 96, 8, 32  # codes, latent dim, LC codebook dim
KEY = jax.random.key(0)


def _latents(batch: int = 2, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, 4, 4, D))


def _quantizer(name: str, **kwargs) -> tuple:
    q = make_quantizer(name, num_codes=N, embed_dim=D, chunk_size=40, **kwargs)
    return q, q.init(KEY, _latents())


# ---------------------------------------------------------------------------------------------------- loss


def test_quantization_loss_value_and_gradients():
    rng = np.random.default_rng(0)
    z, zq = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    mse = np.mean((z - zq) ** 2)
    loss = quantization_loss(jnp.asarray(z), jnp.asarray(zq), alpha=0.7, beta=0.2)
    np.testing.assert_allclose(float(loss), 0.9 * mse, rtol=1e-6)
    g_z, g_zq = jax.grad(lambda a, b: quantization_loss(a, b, alpha=0.7, beta=0.2), (0, 1))(z, zq)
    np.testing.assert_allclose(g_z, 0.7 * 2 * (z - zq) / z.size, rtol=1e-5)  # commitment term only
    np.testing.assert_allclose(g_zq, 0.2 * 2 * (zq - z) / z.size, rtol=1e-5)  # codebook term only


# ------------------------------------------------------------------------------------------- shared interface


@pytest.mark.parametrize("name,kwargs", [
    ("lc", {"codebook_dim": DC}), ("lc", {"codebook_dim": DC, "projector": "mlp"}), ("vq", {}), ("fc", {}),
    ("ema", {}),
])
def test_interface(name, kwargs):
    q, variables = _quantizer(name, **kwargs)
    z = _latents()
    zq, idx, aux = q.apply(variables, z)
    assert zq.shape == z.shape and idx.shape == z.shape[:-1] and idx.dtype == jnp.int32
    assert aux["quant_loss"].shape == () and aux["squared_distances"].shape == z.shape[:-1]
    table = q.apply(variables, method="codebook_vectors")
    assert table.shape == (N, D)
    np.testing.assert_allclose(zq, q.apply(variables, idx, method="embed"), atol=1e-5)
    np.testing.assert_allclose(q.apply(variables, idx, method="embed"), table[idx], atol=1e-5)
    if name != "fc":  # searched in latent space: the nearest effective code, with its distance
        d = jnp.sum((z[..., None, :] - table) ** 2, axis=-1)
        np.testing.assert_array_equal(idx, jnp.argmin(d, axis=-1))
        np.testing.assert_allclose(aux["squared_distances"], jnp.min(d, axis=-1), rtol=1e-5, atol=1e-6)
        beta = 0.0 if name == "ema" else 0.33
        np.testing.assert_allclose(aux["quant_loss"], (1 + beta) * np.mean((zq - z) ** 2), rtol=1e-5)


@pytest.mark.parametrize("name,kwargs", [("lc", {"codebook_dim": DC}), ("vq", {}), ("ema", {})])
def test_straight_through_gradient_is_identity(name, kwargs):
    q, variables = _quantizer(name, **kwargs)
    z = _latents()
    _, vjp = jax.vjp(lambda x: q.apply(variables, x)[0], z)
    cotangent = jax.random.normal(jax.random.key(5), z.shape)
    np.testing.assert_allclose(vjp(cotangent)[0], cotangent, rtol=1e-6)


def test_chunk_size_does_not_change_the_tokens():
    z = _latents(batch=4)
    variables = LCQuantizer(num_codes=N, embed_dim=D, codebook_dim=DC).init(KEY, z)
    results = [LCQuantizer(num_codes=N, embed_dim=D, codebook_dim=DC, chunk_size=chunk_size).apply(variables, z)
               for chunk_size in (None, 7, 40)]
    for zq, idx, aux in results[1:]:
        np.testing.assert_array_equal(idx, results[0][1])
        np.testing.assert_array_equal(aux["squared_distances"], results[0][2]["squared_distances"])


def test_wrong_latent_channels():
    q, variables = _quantizer("vq")
    with pytest.raises(ValueError, match="expected embed_dim=8"):
        q.apply(variables, jnp.zeros((1, 2, 2, 4)))


# ------------------------------------------------------------------------------------------------------- lc


def test_lc_codebook_is_frozen_outside_params():
    q, variables = _quantizer("lc", codebook_dim=DC)
    assert set(variables) == {"params", "codebook"}
    assert variables["codebook"]["embedding"].shape == (N, DC)
    assert set(variables["params"]) == {"codebook_projection"}
    codebook_before = np.array(variables["codebook"]["embedding"])
    z = _latents()

    def loss_fn(params):  # a training step differentiates `params` only; the codebook is an input
        zq, _, aux = q.apply({"params": params, "codebook": variables["codebook"]}, z)
        return aux["quant_loss"] + jnp.mean(zq ** 2)

    optimizer = optax.adam(1e-2)
    params = variables["params"]
    updates, _ = optimizer.update(jax.grad(loss_fn)(params), optimizer.init(params), params)
    new_params = optax.apply_updates(params, updates)
    assert not np.allclose(new_params["codebook_projection"]["kernel"], params["codebook_projection"]["kernel"])
    # Nor does a forward pass write to it, even with every collection mutable.
    _, state = q.apply({"params": new_params, "codebook": variables["codebook"]}, z, train=True, mutable=True)
    np.testing.assert_array_equal(state["codebook"]["embedding"], codebook_before)
    np.testing.assert_array_equal(variables["codebook"]["embedding"], codebook_before)


def test_lc_linear_projector_init_matches_release():
    q = LCQuantizer(num_codes=16, embed_dim=D, codebook_dim=768)
    dense = q.init(KEY, _latents())["params"]["codebook_projection"]
    kernel, bias = np.asarray(dense["kernel"]), np.asarray(dense["bias"])
    assert kernel.shape == (768, D) and bias.shape == (D,)
    np.testing.assert_allclose(kernel.std(), D ** -0.5, rtol=0.05)  # torch.nn.init.normal_(std=D'^-0.5)
    assert abs(kernel.mean()) < 0.02
    assert np.all(np.abs(bias) <= 768 ** -0.5) and np.any(bias != 0)  # torch Linear default bias U(+-1/sqrt(in))


def test_lc_mlp_shapes_and_torch_keys():
    q, variables = _quantizer("lc", codebook_dim=DC, projector="mlp")
    params = variables["params"]
    assert params["codebook_projection_0"]["kernel"].shape == (DC, 256)
    assert params["codebook_projection_2"]["kernel"].shape == (256, D)
    state_dict = {"codebook_projection.0.weight": np.zeros((256, DC)), "codebook_projection.0.bias": np.zeros(256),
                  "codebook_projection.2.weight": np.ones((D, 256)), "codebook_projection.2.bias": np.zeros(D)}
    mapped = map_state_dict(state_dict, {"params": params})
    np.testing.assert_array_equal(mapped["params"]["codebook_projection_2"]["kernel"], np.ones((256, D)))


@pytest.mark.parametrize("projector", ["linear", "mlp"])
def test_lc_projector_gradient_equals_naive(projector):
    q, variables = _quantizer("lc", codebook_dim=DC, projector=projector)
    codebook = variables["codebook"]
    z = _latents(batch=4)
    indices = q.apply(variables, z)[1]

    def efficient(params):  # project the selected rows only
        return q.apply({"params": params, "codebook": codebook}, z)[2]["quant_loss"]

    def naive(params):  # project the whole codebook, then gather (the release)
        table = q.apply({"params": params, "codebook": codebook}, method="codebook_vectors")
        return quantization_loss(z, table[indices])

    got, want = jax.grad(efficient)(variables["params"]), jax.grad(naive)(variables["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(got))


def test_lc_bad_projector():
    with pytest.raises(ValueError, match="unknown projector 'conv'"):
        LCQuantizer(num_codes=N, embed_dim=D, projector="conv")


# ------------------------------------------------------------------------------------------------ vq and fc


def test_vq_codebook_is_trained_by_the_loss():
    q, variables = _quantizer("vq")
    table = variables["params"]["embedding"]
    assert table.shape == (N, D) and float(jnp.abs(table).max()) <= 1 / N
    z = _latents()
    idx = np.asarray(q.apply(variables, z)[1]).ravel()
    grad = jax.grad(lambda p: q.apply({"params": p}, z)[2]["quant_loss"])(variables["params"])["embedding"]
    # codebook term 0.33 * mean((e - sg(z))^2): each selected code is pulled toward its latents, the others not at all
    want = np.zeros((N, D))
    np.add.at(want, idx, 0.33 * 2 * (np.asarray(table)[idx] - np.asarray(z).reshape(-1, D)) / z.size)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-9)
    assert np.all(np.asarray(grad)[np.setdiff1d(np.arange(N), idx)] == 0)


def test_fc_searches_normalised_low_dim_codes():
    q, variables = _quantizer("fc", code_dim=4)
    params = variables["params"]
    assert params["embedding"].shape == (N, 4)
    assert params["to_code"]["kernel"].shape == (D, 4) and params["from_code"]["kernel"].shape == (4, D)
    z = _latents()
    zq, idx, aux = q.apply(variables, z)
    code_z = l2_normalize(z @ params["to_code"]["kernel"] + params["to_code"]["bias"])
    codes = l2_normalize(params["embedding"])
    d = jnp.sum((code_z[..., None, :] - codes) ** 2, axis=-1)
    np.testing.assert_array_equal(idx, jnp.argmin(d, axis=-1))
    assert float(jnp.max(aux["squared_distances"])) <= 4.0 + 1e-5  # unit vectors
    np.testing.assert_allclose(aux["quant_loss"], 1.33 * jnp.mean((codes[idx] - code_z) ** 2), rtol=1e-5)
    grads = jax.grad(lambda p: q.apply({"params": p}, z)[2]["quant_loss"])(params)
    assert float(jnp.abs(grads["embedding"]).max()) > 0 and float(jnp.abs(grads["to_code"]["kernel"]).max()) > 0


# ------------------------------------------------------------------------------------------------------ ema


def _ema_reference(state: dict, z: np.ndarray, idx: np.ndarray, decay: float, eps: float) -> dict:
    counts = np.bincount(idx, minlength=N).astype(np.float64)
    sums = np.zeros((N, D))
    np.add.at(sums, idx, z)
    cluster_size = decay * np.asarray(state["cluster_size"], np.float64) + (1 - decay) * counts
    embed_sum = decay * np.asarray(state["embed_sum"], np.float64) + (1 - decay) * sums
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + N * eps) * n
    return {"cluster_size": cluster_size, "embed_sum": embed_sum, "embedding": embed_sum / smoothed[:, None]}


def test_ema_state_init_and_update_match_reference():
    q, variables = _quantizer("ema")
    assert set(variables) == {"ema_state"}
    state = variables["ema_state"]
    np.testing.assert_array_equal(state["cluster_size"], np.zeros(N))
    np.testing.assert_array_equal(state["embed_sum"], state["embedding"])
    assert float(jnp.abs(state["embedding"]).max()) <= 1 / N
    z = _latents()
    (zq, idx, aux), new = q.apply(variables, z, train=True, mutable=["ema_state"])
    np.testing.assert_allclose(zq, state["embedding"][idx], atol=1e-6)  # zq from the codebook before the update
    want = _ema_reference(state, np.asarray(z).reshape(-1, D), np.asarray(idx).reshape(-1), 0.99, 1e-5)
    for key in want:
        np.testing.assert_allclose(new["ema_state"][key], want[key], rtol=1e-4, atol=1e-7)
    unused = np.asarray(want["cluster_size"]) == 0
    assert unused.any() and np.all(np.isfinite(new["ema_state"]["embedding"]))  # Laplace smoothing: no 0-division
    # Not updated in evaluation, nor when the collection is immutable.
    _, same = q.apply(variables, z, train=False, mutable=["ema_state"])
    jax.tree.map(np.testing.assert_array_equal, same, variables)
    q.apply(variables, z, train=True)


def test_ema_codes_move_to_their_latents():
    q = EMAQuantizer(num_codes=N, embed_dim=D, decay=0.8)
    centres = 3.0 * jax.random.normal(jax.random.key(7), (4, D))
    z = (centres[:, None] + 0.1 * jax.random.normal(jax.random.key(8), (4, 32, D))).reshape(8, 4, 4, D)
    variables = q.init(KEY, z)
    step = jax.jit(lambda v: q.apply(v, z, train=True, mutable=["ema_state"]))
    for _ in range(60):
        (_, idx, aux), variables = step(variables)
    table = variables["ema_state"]["embedding"]
    flat_z, flat_idx = np.asarray(z).reshape(-1, D), np.asarray(idx).reshape(-1)
    for code in np.unique(flat_idx):
        np.testing.assert_allclose(table[code], flat_z[flat_idx == code].mean(0), atol=2e-3)
    assert float(aux["quant_loss"]) < 0.02  # commitment only: the latents' spread around their centres


def test_ema_loss_is_commitment_only():
    q, variables = _quantizer("ema", alpha=0.5)
    z = _latents()
    zq = q.apply(variables, z)[0]
    grad = jax.grad(lambda x: q.apply(variables, x)[2]["quant_loss"])(z)
    np.testing.assert_allclose(grad, 0.5 * 2 * (z - zq) / z.size, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------- utilization and sharding


def test_counts_utilization_perplexity():
    counts = code_counts(jnp.array([[0, 0], [0, 1]]), 4)
    np.testing.assert_array_equal(counts, [3, 1, 0, 0])
    assert counts.dtype == jnp.int32
    assert float(utilization(counts)) == 0.5
    np.testing.assert_allclose(perplexity(counts), np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))), rtol=1e-6)
    np.testing.assert_allclose(perplexity(jnp.full(16, 5)), 16.0, rtol=1e-6)
    assert float(perplexity(jnp.zeros(4, jnp.int32))) == 1.0


def _sharded(x: jax.Array, spec: PartitionSpec, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    return jax.device_put(x, NamedSharding(mesh or jax.make_mesh((8,), ("data",)), spec))


def test_counts_of_a_sharded_batch_are_global():
    idx = jax.random.randint(jax.random.key(3), (16, 4, 4), 0, 50)
    sharded = _sharded(idx, PartitionSpec("data"))
    assert len(sharded.sharding.device_set) == 8
    counts = jax.jit(code_counts, static_argnums=1)(sharded, 50)
    np.testing.assert_array_equal(counts, np.bincount(np.asarray(idx).ravel(), minlength=50))


def test_ema_update_of_a_sharded_batch_matches_unsharded():
    q, variables = _quantizer("ema")
    z = _latents(batch=16, seed=4)
    step = jax.jit(lambda v, x: q.apply(v, x, train=True, mutable=["ema_state"]))
    (_, idx, _), unsharded = step(variables, z)
    (_, idx_s, _), sharded = step(_sharded(variables, PartitionSpec()), _sharded(z, PartitionSpec("data")))
    np.testing.assert_array_equal(idx_s, idx)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), sharded, unsharded)
    # the pure update on explicitly sharded inputs agrees as well
    flat = _sharded(z.reshape(-1, D), PartitionSpec("data"))
    direct = jax.jit(lambda s, x, i: ema_update(s, x, i, decay=0.99, eps=1e-5))(
        variables["ema_state"], flat, _sharded(idx.reshape(-1), PartitionSpec("data")))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), direct, unsharded["ema_state"])


def test_lc_with_codebook_split_over_model_axis():
    """The trainer's layout: explicit (data, model) mesh, batch over data, frozen codebook rows over model."""
    q, variables = _quantizer("lc", codebook_dim=DC)
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    z = _latents(batch=8, seed=6)

    def step(v, x):
        out = q.apply(v, x)
        grads = jax.grad(lambda p: q.apply({**v, "params": p}, x)[2]["quant_loss"])(v["params"])
        return out, grads, code_counts(out[1], N)

    sharded_vars = {"params": _sharded(variables["params"], PartitionSpec(), mesh),
                    "codebook": _sharded(variables["codebook"], PartitionSpec("model", None), mesh)}
    with jax.set_mesh(mesh):
        got = jax.jit(step)(sharded_vars, _sharded(z, PartitionSpec("data"), mesh))
    want = jax.jit(step)(variables, z)
    assert got[0][1].sharding.spec[0] == "data"
    np.testing.assert_array_equal(got[0][1], want[0][1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


# ------------------------------------------------------------------------------------ registry and loading


def test_registry():
    assert set(QUANTIZERS) == {"lc", "vq", "fc", "ema", "l2vq", "fq"}
    assert isinstance(make_quantizer("fc", num_codes=4, embed_dim=2), FCQuantizer)
    assert isinstance(make_quantizer("vq", num_codes=4, embed_dim=2), VQQuantizer)
    with pytest.raises(ValueError, match=r"unknown quantizer 'lfq'; choices: lc, vq, fc, ema, l2vq, fq"):
        make_quantizer("lfq", num_codes=4, embed_dim=2)
    with pytest.raises(ValueError, match=r"unknown options \['codebook_dim'\]"):
        make_quantizer("vq", num_codes=4, embed_dim=2, codebook_dim=3)
    with pytest.raises(ValueError, match="num_codes and embed_dim must be positive"):
        make_quantizer("ema", num_codes=0, embed_dim=2)


def test_load_codebook_npy(tmp_path):
    good = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.save(tmp_path / "good.npy", good)
    loaded = load_codebook(tmp_path / "good.npy", expected_dim=4)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, good)
    np.save(tmp_path / "flat.npy", np.zeros(5))
    with pytest.raises(ValueError, match=r"flat\.npy: expected a 2-D array"):
        load_codebook(tmp_path / "flat.npy")
    with pytest.raises(ValueError, match=r"good\.npy: codebook dim 4 != expected 768"):
        load_codebook(tmp_path / "good.npy", expected_dim=768)
    with pytest.raises(ValueError, match="unsupported extension '.txt'"):
        load_codebook(tmp_path / "codebook.txt")


def test_load_codebook_pth(tmp_path, monkeypatch):
    table = np.ones((5, 3), np.float16)
    contents = {"plain.pth": table, "ckpt.pth": {"model": {"tok_embeddings.weight": table, "other": 1}},
                "bad.pth": {"model": {"encoder.weight": table}}}
    fake = types.ModuleType("vqlc_jax.convert.torch_file")
    fake.load_torch_file = lambda path: contents[path.name]
    monkeypatch.setitem(sys.modules, "vqlc_jax.convert.torch_file", fake)
    for name in ("plain.pth", "ckpt.pth"):
        loaded = load_codebook(tmp_path / name, expected_dim=3)
        assert loaded.dtype == np.float32 and loaded.shape == (5, 3)
    with pytest.raises(ValueError, match=r"bad\.pth: no 'tok_embeddings.weight'"):
        load_codebook(tmp_path / "bad.pth")


def test_lc_matches_the_official_release(fixtures_dir):
    """Codebook and projector from an official-layout checkpoint: same projected codebook, tokens and loss as torch."""
    fixture = np.load(fixtures_dir / "official_vqgan_lc" / "tiny_linear.npz")
    codebook = load_codebook(fixtures_dir / "official_vqgan_lc" / "tiny_linear.pth", expected_dim=32)
    np.testing.assert_array_equal(codebook, fixture["state_dict/tok_embeddings.weight"])
    q = LCQuantizer(num_codes=codebook.shape[0], embed_dim=8, codebook_dim=32, chunk_size=100)
    z = jnp.asarray(fixture["encoded"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    template = jax.eval_shape(q.init, KEY, z)
    projector = {k: fixture[f"state_dict/{k}"] for k in ("codebook_projection.weight", "codebook_projection.bias")}
    variables = {**map_state_dict(projector, {"params": template["params"]}), "codebook": {"embedding": codebook}}
    zq, idx, aux = q.apply(variables, z)
    np.testing.assert_allclose(q.apply(variables, method="codebook_vectors"), fixture["projected_codebook"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(idx).reshape(idx.shape[0], -1), fixture["indices"])
    np.testing.assert_allclose(aux["quant_loss"], fixture["quant_loss"], rtol=1e-4)


def test_sub_codebook_helpers_lay_codebooks_end_to_end():
    from vqlc_jax.quantizers.utilization import joint_ids, out_of_range, split_counts

    tokens = np.array([[[0, 2], [1, 0], [4, 3]]])  # [B=1, k=3, 2] with sizes (3, 2, 5)
    sizes = (3, 2, 5)
    np.testing.assert_array_equal(joint_ids(tokens, sizes), [[[0, 2], [4, 3], [9, 8]]])
    np.testing.assert_array_equal(joint_ids(jnp.asarray(tokens), sizes), [[[0, 2], [4, 3], [9, 8]]])
    np.testing.assert_array_equal(joint_ids(tokens[:, 0], (3,)), tokens[:, 0])
    parts = split_counts(np.arange(10), sizes)
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9]]
    assert out_of_range(tokens, sizes) is None
    assert out_of_range(tokens, (3, 1, 5)) == (1, 0, 1)
    assert out_of_range(tokens[:, 2], (4,)) == (0, 3, 4)
