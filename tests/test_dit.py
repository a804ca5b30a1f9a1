"""DiT: parity with the release's model (dit_tiny fixture: conditioning, tokens, forward, CFG on 3 and on all
channels), the loader's inputs and errors, DiT's init, and guided sampling in one batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from vqlc_jax.convert.official_dit import load_official_dit
from vqlc_jax.convert.torch_layout import CheckpointMismatchError
from vqlc_jax.generators import load_official
from vqlc_jax.models.dit import DIT_SIZES, DiT, guided_model_fn, guided_output, sincos_pos_embed_2d, timestep_embedding

NULL = 10


@pytest.fixture(scope="module")
def dit_tiny(fixtures_dir):
    root = fixtures_dir / "official_generators"
    with np.load(root / "dit_tiny.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["state_dict"] = {k.removeprefix("state_dict/"): v for k, v in arrays.items() if k.startswith("state_dict/")}
    arrays["root"] = root
    return arrays


@pytest.fixture(scope="module")
def loaded(dit_tiny):
    return load_official_dit(dit_tiny["root"] / "dit_tiny.pth", num_heads=4)


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


def test_embeddings_match_release(dit_tiny, loaded):
    model, variables = loaded
    t, y, x = jnp.asarray(dit_tiny["t"]), jnp.asarray(dit_tiny["y"]), jnp.asarray(nhwc(dit_tiny["x"]))
    errors = {"c": relative_error(model.apply(variables, t, y, method=DiT.conditioning), dit_tiny["c"]),
              "tokens": relative_error(model.apply(variables, x, method=DiT.tokens), dit_tiny["tokens"]),
              "pos_embed": relative_error(sincos_pos_embed_2d(64, 4)[None], dit_tiny["state_dict"]["pos_embed"])}
    # torch's float32 exp is 1 ulp off the correctly rounded one at 3 of the 128 frequencies, which moves t f by up
    # to t x 6e-8 (6e-5 at t = 999): t_freq is checked to that; `c` and the forward outputs stay within 1e-5.
    errors["t_freq"] = relative_error(timestep_embedding(t), dit_tiny["t_freq"])
    print("dit_tiny embeddings relative errors:", errors)
    assert errors.pop("t_freq") < 6e-5
    assert max(errors.values()) < 1e-5


@pytest.mark.parametrize("suffix", ["pth", "npz"])
def test_forward_and_cfg_match_release(dit_tiny, suffix):
    model, variables = load_official("dit", dit_tiny["root"] / f"dit_tiny.{suffix}", num_heads=4)
    assert (model.input_size, model.hidden_size, model.depth, model.patch_size, model.in_channels,
            model.num_classes, model.learn_sigma, model.mlp_ratio) == (8, 64, 2, 2, 8, 10, True, 4.0)
    x, t, y = jnp.asarray(nhwc(dit_tiny["x"])), jnp.asarray(dit_tiny["t"]), jnp.asarray(dit_tiny["y"])
    x2, t2, y2 = jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, jnp.full_like(y, NULL)])
    cfg = lambda channels: model.apply(variables, x2, t2, y2, 4.0, channels=channels,  # noqa: E731
                                       method=DiT.forward_with_cfg)
    errors = {"out": relative_error(model.apply(variables, x, t, y), nhwc(dit_tiny["out"])),
              "out_cfg (3 channels)": relative_error(cfg(3), nhwc(dit_tiny["out_cfg"])),
              "out_cfg_all": relative_error(cfg(None), nhwc(dit_tiny["out_cfg_all"]))}
    print(f"dit_tiny.{suffix} relative errors:", errors)
    assert max(errors.values()) < 1e-5


def test_guided_model_fn_is_the_release_first_half(dit_tiny, loaded):
    """Sampling B rows with the 2B batch inside the model function gives the rows the release keeps."""
    model, variables = loaded
    x, t, y = jnp.asarray(nhwc(dit_tiny["x"])), jnp.asarray(dit_tiny["t"]), jnp.asarray(dit_tiny["y"])
    apply = lambda *a: model.apply(variables, *a)  # noqa: E731
    for channels, key in ((3, "out_cfg"), (None, "out_cfg_all")):
        fn = guided_model_fn(apply, y, 4.0, null_label=NULL, eps_channels=8, channels=channels)
        assert relative_error(fn(x, t), nhwc(dit_tiny[key])[:3]) < 1e-5


def test_guided_output_formula():
    rng = np.random.default_rng(0)
    out = rng.standard_normal((4, 2, 2, 6)).astype(np.float32)
    got = np.asarray(guided_output(jnp.asarray(out), 3.0, eps_channels=3, channels=2))
    cond, uncond = out[:2], out[2:]
    g = uncond[..., :2] + 3.0 * (cond[..., :2] - uncond[..., :2])
    np.testing.assert_allclose(got[:2, ..., :2], g, rtol=1e-6)
    np.testing.assert_allclose(got[2:, ..., :2], g, rtol=1e-6)
    np.testing.assert_array_equal(got[..., 2:], out[..., 2:])
    with pytest.raises(ValueError, match="scale 0.5"):
        guided_output(jnp.asarray(out), 0.5, eps_channels=3)
    with pytest.raises(ValueError, match="channels=4"):
        guided_output(jnp.asarray(out), 2.0, eps_channels=3, channels=4)


def test_loader_reads_checkpoint_layouts(dit_tiny):
    """train.py checkpoints ({'model', 'ema', ...}): the EMA weights are read; `module.` is stripped."""
    sd = dit_tiny["state_dict"]
    shifted = {k: v + 1.0 if k.endswith("bias") else v for k, v in sd.items()}
    x, t, y = jnp.asarray(nhwc(dit_tiny["x"])), jnp.asarray(dit_tiny["t"]), jnp.asarray(dit_tiny["y"])
    for source in ({"model": shifted, "ema": sd, "args": None}, {f"module.{k}": v for k, v in sd.items()}):
        model, variables = load_official_dit(source, num_heads=4)
        assert relative_error(model.apply(variables, x, t, y), nhwc(dit_tiny["out"])) < 1e-5


def test_bad_checkpoint_lists_every_problem(dit_tiny):
    state = dict(dit_tiny["state_dict"])
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.extra.weight"] = np.zeros((64, 64), np.float32)
    state["blocks.0.attn.proj.weight"] = np.zeros((64, 63), np.float32)
    state["pos_embed"] = state["pos_embed"] + 0.5
    with pytest.raises(CheckpointMismatchError) as err:
        load_official_dit(state, num_heads=4)
    message = str(err.value)
    for expected in ("blocks_1/mlp/fc2/bias", "blocks.0.attn.extra.weight", "blocks.0.attn.proj.weight: (64, 63)",
                     "pos_embed"):
        assert expected in message, (expected, message)
    with pytest.raises(CheckpointMismatchError, match="missing pos_embed"):
        load_official_dit({k: v for k, v in dit_tiny["state_dict"].items() if k != "pos_embed"}, num_heads=4)
    with pytest.raises(ValueError, match="num_heads=5"):
        load_official_dit(dit_tiny["state_dict"], num_heads=5)


def test_fresh_model_predicts_zero_and_checks_inputs():
    model = DiT(input_size=8, hidden_size=32, depth=1, num_heads=2, in_channels=4, num_classes=5)
    x = jnp.ones((2, 8, 8, 4))
    t, y = jnp.array([3, 500]), jnp.array([1, 5])
    variables = jax.jit(model.init)(jax.random.key(0), x, t, y)
    p = variables["params"]
    assert p["y_embedder"]["embedding_table"]["embedding"].shape == (6, 32)
    assert not np.any(p["blocks_0"]["adaLN_modulation_1"]["kernel"])
    assert not np.any(p["final_layer"]["linear"]["kernel"])
    patch_kernel = np.asarray(p["x_embedder"]["proj"]["kernel"])  # xavier over (p*p*C -> hidden): |w| <= sqrt(6/48)
    assert np.abs(patch_kernel).max() <= np.sqrt(6 / (16 + 32)) and np.abs(patch_kernel).max() > 0.3
    out = jax.jit(model.apply)(variables, x, t, y)
    assert out.shape == (2, 8, 8, 8) and out.dtype == jnp.float32 and not np.any(out)
    with pytest.raises(ValueError, match=r"input of shape \(2, 8, 8, 3\)"):
        model.apply(variables, jnp.ones((2, 8, 8, 3)), t, y)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DiT(input_size=8, hidden_size=30, depth=1, num_heads=4)
    assert DIT_SIZES["XL"] == (28, 1152, 16)


@pytest.mark.slow
def test_bf16_and_remat_follow_float32(dit_tiny, loaded):
    model, variables = loaded
    x, t, y = jnp.asarray(nhwc(dit_tiny["x"])), jnp.asarray(dit_tiny["t"]), jnp.asarray(dit_tiny["y"])
    ref = nhwc(dit_tiny["out"])
    remat = model.clone(remat=True)
    grads = [jax.jit(jax.grad(lambda v, m=m: jnp.sum(m.apply(v, x, t, y) ** 2)))(variables) for m in (model, remat)]
    assert relative_error(jax.jit(remat.apply)(variables, x, t, y), ref) < 1e-5
    assert max(jax.tree.leaves(jax.tree.map(relative_error, grads[1], grads[0]))) < 1e-4
    assert relative_error(jax.jit(model.clone(dtype=jnp.bfloat16).apply)(variables, x, t, y), ref) < 5e-2
