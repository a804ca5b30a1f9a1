"""LDM UNet: parity with the release (`official_diffusion/ldm_tiny`), checkpoint loading, configs, bad input."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from vqlc_jax.convert.official import read_state_dict
from vqlc_jax.convert.official_ldm import load_official_ldm
from vqlc_jax.convert.torch_layout import CheckpointMismatchError
from vqlc_jax.generators import load_official
from vqlc_jax.models.unet import LDM_F8, LDM_F16, UNet

TINY = dict(num_head_channels=16)  # the one size the weights cannot tell


@pytest.fixture(scope="module")
def ldm(fixtures_dir):
    root = fixtures_dir / "official_diffusion"
    with np.load(root / "ldm_tiny.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return {"root": root, **arrays, "x_nhwc": arrays["x"].transpose(0, 2, 3, 1),
            "eps_nhwc": arrays["eps"].transpose(0, 2, 3, 1)}


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, x, t, y):
    return model.apply(variables, x, t, y)  # one compilation per UNet configuration


def _eps(model, variables, ldm):
    return np.asarray(_apply(model, variables, ldm["x_nhwc"], ldm["t"], ldm["labels"]))


@pytest.mark.parametrize("suffix", ["pth", "npz"])
def test_parity_with_release(ldm, suffix):
    """eps = apply_model(x, t, ClassEmbedder(labels)) inside ema_scope, and the context token, at 1e-5; the release's
    `unet_config` keys are accepted and checked against the weights."""
    unet_config = json.loads((ldm["root"] / "ldm_tiny.json").read_text())["unet"]
    model, variables = load_official("ldm", ldm["root"] / f"ldm_tiny.{suffix}", **unet_config)
    eps_err = relative_error(_eps(model, variables, ldm), ldm["eps_nhwc"])
    ctx_err = relative_error(model.apply(variables, ldm["labels"], method=UNet.context), ldm["context"])
    print(f"ldm_tiny.{suffix}: eps rel err {eps_err:.2e}, context rel err {ctx_err:.2e}")
    assert eps_err < 1e-5 and ctx_err < 1e-5
    assert (model.num_classes, model.context_dim, model.channel_mult, model.attention_resolutions) == (
        10, 16, (1, 2), (1,))


def test_ema_weights_by_default(ldm):
    """The release samples with `model_ema.*`; decoy `model.diffusion_model.*` weights must not be read."""
    state = read_state_dict(ldm["root"] / "ldm_tiny.pth")
    decoy = {k: (v * 1.5 if k.startswith("model.diffusion_model.") else v) for k, v in state.items()}
    model, variables = load_official_ldm(decoy, **TINY)
    assert relative_error(_eps(model, variables, ldm), ldm["eps_nhwc"]) < 1e-5
    model, variables = load_official_ldm(decoy, weights="model", **TINY)
    assert relative_error(_eps(model, variables, ldm), ldm["eps_nhwc"]) > 1e-2
    no_ema = {k: v for k, v in state.items() if not k.startswith("model_ema.diffusion_model")}
    with pytest.raises(CheckpointMismatchError, match="weights='ema' but no model_ema.diffusion_model"):
        load_official_ldm(no_ema, weights="ema", **TINY)


def test_bad_checkpoint_lists_every_problem(ldm):
    state = read_state_dict(ldm["root"] / "ldm_tiny.npz")
    state.pop("model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    state["model.diffusion_model.input_blocks.1.0.emb_layers.1.weight"] = np.zeros((32, 7), np.float16)
    state["model.diffusion_model.extra.weight"] = np.zeros(3, np.float16)
    state["optimizer.step"] = np.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_official_ldm(state, **TINY)
    text = str(err.value)
    for part in ("middle_block_1/transformer_blocks_0/attn2/to_k/kernel", "input_blocks.1.0.emb_layers.1.weight",
                 "model.diffusion_model.extra.weight", "optimizer.step"):
        assert part in text, text
    with pytest.raises(CheckpointMismatchError, match=r"channel_mult=\[1, 4\] but the weights hold \(1, 2\)"):
        load_official_ldm(ldm["root"] / "ldm_tiny.npz", channel_mult=[1, 4], **TINY)
    with pytest.raises(ValueError, match="use_scale_shift_norm=True"):
        load_official_ldm(ldm["root"] / "ldm_tiny.npz", use_scale_shift_norm=True, **TINY)


@pytest.mark.parametrize("config, size, attends, middle_heads", [
    (LDM_F16, 16, {"input_blocks_1_1": True, "input_blocks_5_1": False, "output_blocks_7_1": True}, 32),
    (LDM_F8, 32, {"input_blocks_1_1": True, "input_blocks_4_1": True, "input_blocks_7_1": True}, 32),
])
def test_release_configs_build(config, size, attends, middle_heads):
    """f16: attention at the 16x16 level (factor 1) and the middle only; f8: at every level; 32 channels per head."""
    model = UNet(**config)
    b = 2
    shapes = (jax.ShapeDtypeStruct((b, size, size, config["in_channels"]), jnp.float32),
              jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))
    variables = jax.eval_shape(model.init, jax.random.key(0), *shapes)
    out = jax.eval_shape(model.apply, variables, *shapes)
    assert out.shape == (b, size, size, config["out_channels"]) and out.dtype == jnp.float32
    params = variables["params"]
    for name, has_attention in attends.items():
        assert (name in params) == has_attention, name
    assert params["class_embedder"]["embedding"].shape == (1001, 512)
    assert model.heads(model.model_channels * config["channel_mult"][-1]) == (middle_heads, 32)
    assert params["middle_block_1"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"].shape == (512, 1024)
    n_blocks = 1 + config["num_res_blocks"] * len(config["channel_mult"]) + len(config["channel_mult"]) - 1
    assert sum(k.startswith("input_blocks_") and k.endswith("_0") for k in params) == n_blocks
    assert sum(k.startswith("output_blocks_") and k.endswith("_0") for k in params) == n_blocks


def test_bf16_follows_float32(ldm):
    model, variables = load_official_ldm(ldm["root"] / "ldm_tiny.npz", dtype=jnp.bfloat16, **TINY)
    assert relative_error(_eps(model, variables, ldm), ldm["eps_nhwc"]) < 5e-2


def test_remat_checkpoints_every_block():
    """With `remat` the UNet (dropout on, training) traces one checkpoint per ResBlock and transformer: 3 + 3 + 6
    (input blocks res + transformer, res; middle 3; output 2 x res, 2 x (res + transformer)), and its gradient
    traces too."""
    config = dict(in_channels=8, out_channels=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(1,), num_head_channels=16, context_dim=16, num_classes=10)
    shapes = (jax.ShapeDtypeStruct((2, 8, 8, 8), jnp.float32), jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32))
    counts = []
    for remat in (False, True):
        model = UNet(**config, dropout=0.1, remat=remat)
        params = jax.eval_shape(model.init, jax.random.key(0), *shapes)["params"]

        def loss(p, x, model=model):
            out = model.apply({"params": p}, x, *shapes[1:], train=True, rngs={"dropout": jax.random.key(1)})
            return jnp.sum(out ** 2)

        jaxpr = jax.make_jaxpr(loss)(params, shapes[0])
        counts.append(sum(eqn.primitive.name in ("checkpoint", "remat2") for eqn in jaxpr.jaxpr.eqns))
        grads = jax.eval_shape(jax.grad(loss), params, shapes[0])
        assert jax.tree.map(lambda a: a.shape, grads) == jax.tree.map(lambda a: a.shape, params)
    assert counts == [0, 12]


def test_bad_input_and_config():
    model = UNet(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(2,), num_head_channels=16, context_dim=8, num_classes=3)
    t = y = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match=r"expected \[B, H, W, 4\]"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)), t, y)
    with pytest.raises(ValueError, match="divisible by 2"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 7, 8, 4)), t, y)
    with pytest.raises(ValueError, match="must start with 1"):
        UNet(in_channels=4, out_channels=4, model_channels=32, channel_mult=(2, 4), num_res_blocks=1,
             attention_resolutions=(1,))
    with pytest.raises(ValueError, match="not divisible by num_head_channels=48"):
        UNet(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1,), num_res_blocks=1,
             attention_resolutions=(1,), num_head_channels=48)


def test_dropout_only_in_training(ldm):
    model, variables = load_official_ldm(ldm["root"] / "ldm_tiny.npz", dropout=0.5, **TINY)
    assert relative_error(_eps(model, variables, ldm), ldm["eps_nhwc"]) < 1e-5
    apply = jax.jit(lambda v, *args: model.apply(v, *args, train=True, rngs={"dropout": jax.random.key(0)}))
    train = apply(variables, ldm["x_nhwc"], ldm["t"], ldm["labels"])
    assert relative_error(train, ldm["eps_nhwc"]) > 1e-2
