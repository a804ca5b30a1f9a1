"""ViT over token embeddings and the MAE/timm checkpoint loader: parity with timm (vit_tiny fixture, from the `.pth`
and the `.npz`), average pooling against a numpy forward, MAE's pretraining layout, position resizing, drop path,
and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy.special import erf

from conftest import relative_error
from vqlc_jax.convert.mae_weights import load_official_vit, resize_pos_embed, vit_from_state_dict
from vqlc_jax.convert.torch_layout import CheckpointMismatchError
from vqlc_jax.models.vit import VIT_SIZES, ViT, drop_path

TOL = 1e-5
OUTPUTS = {"features": ViT.features, "pooled": ViT.pooled, "logits": ViT.__call__}


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    root = fixtures_dir / "vit_tiny"
    with np.load(root / "reference.npz") as data:
        arrays = {k: data[k] for k in data.files}
    state = {k.removeprefix("state_dict/"): v for k, v in arrays.items() if k.startswith("state_dict/")}
    return {"root": root, "state": state, **{k: v for k, v in arrays.items() if not k.startswith("state_dict/")}}


def numpy_vit(state: dict, tokens: np.ndarray, num_heads: int, global_pool: str) -> dict:
    """timm's VisionTransformer forward from given token embeddings, in float64 numpy."""
    sd = {k: v.astype(np.float64) for k, v in state.items()}

    def norm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-6) * sd[f"{name}.weight"] + sd[f"{name}.bias"]

    def linear(x, name):
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    batch, width = tokens.shape[0], tokens.shape[-1]
    x = np.concatenate([np.broadcast_to(sd["cls_token"], (batch, 1, width)), tokens], axis=1) + sd["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        q, k, v = linear(norm(x, f"blocks.{i}.norm1"), f"blocks.{i}.attn.qkv").reshape(
            batch, -1, 3, num_heads, width // num_heads).transpose(2, 0, 3, 1, 4)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(width // num_heads)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        attn = (probs / probs.sum(-1, keepdims=True) @ v).transpose(0, 2, 1, 3).reshape(batch, -1, width)
        x = x + linear(attn, f"blocks.{i}.attn.proj")
        h = linear(norm(x, f"blocks.{i}.norm2"), f"blocks.{i}.mlp.fc1")
        x = x + linear(0.5 * h * (1 + erf(h / np.sqrt(2))), f"blocks.{i}.mlp.fc2")
    if global_pool == "token":
        features = norm(x, "norm")
        pooled = features[:, 0]
    else:
        features = x
        pooled = norm(x[:, 1:].mean(1), "fc_norm")
    return {"features": features, "pooled": pooled, "logits": linear(pooled, "head")}


def outputs(model, variables, tokens) -> dict:
    return {name: model.apply(variables, tokens, method=method) for name, method in OUTPUTS.items()}


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("file", ["vit.pth", "reference.npz"])
def test_parity_with_timm(fixture, file):
    model, variables = load_official_vit(fixture["root"] / file, num_heads=2)
    sizes = (model.num_tokens, model.width, model.depth, model.num_classes, model.global_pool)
    assert sizes == (16, 32, 2, 10, "token")
    out = outputs(model, variables, fixture["token_embeddings"])
    for name in OUTPUTS:
        assert out[name].shape == fixture[name].shape, name
        assert relative_error(out[name], fixture[name]) < TOL, name


def test_numpy_reference_matches_timm(fixture):
    """The numpy forward used below for average pooling reproduces timm on the fixture."""
    ref = numpy_vit(fixture["state"], fixture["token_embeddings"], 2, "token")
    for name in OUTPUTS:
        assert relative_error(ref[name], fixture[name]) < 1e-6, name


def test_average_pooling_with_fc_norm(fixture):
    """MAE's fine-tuning layout: no `norm`, `fc_norm` on the mean of the non-CLS tokens (read off the checkpoint)."""
    rng = np.random.default_rng(0)
    state = {k: v for k, v in fixture["state"].items() if not k.startswith("norm.")}
    state["fc_norm.weight"] = rng.uniform(0.5, 1.5, 32).astype(np.float32)
    state["fc_norm.bias"] = rng.normal(0, 0.1, 32).astype(np.float32)
    model, variables = vit_from_state_dict(state, num_heads=2)
    assert model.global_pool == "avg"
    out = outputs(model, variables, fixture["token_embeddings"])
    ref = numpy_vit(state, fixture["token_embeddings"], 2, "avg")
    for name in OUTPUTS:
        assert relative_error(out[name], ref[name]) < TOL, name


def test_mae_pretrain_layout_initialises_head_and_fc_norm(fixture):
    """MAE's pretrain checkpoint: patch embedding (skipped), blocks and `norm` (dropped with avg pooling), no head.
    The blocks are the checkpoint's; `fc_norm` and a 5-class head start at their initialisation."""
    state = {k: v for k, v in fixture["state"].items() if not k.startswith("head.")}
    state["mask_token"] = np.zeros((1, 1, 32), np.float32)
    model, variables = vit_from_state_dict(state, num_heads=2, num_classes=5, global_pool="avg", seed=3)
    params = variables["params"]
    np.testing.assert_array_equal(params["blocks_1"]["attn"]["qkv"]["kernel"], state["blocks.1.attn.qkv.weight"].T)
    assert "norm" not in params
    np.testing.assert_array_equal(params["fc_norm"]["scale"], np.ones(32))
    assert params["head"]["kernel"].shape == (32, 5) and 0 < np.abs(params["head"]["kernel"]).max() < 1e-4
    np.testing.assert_array_equal(params["head"]["bias"], np.zeros(5))
    assert model.apply(variables, fixture["token_embeddings"]).shape == (2, 5)
    # a head of another class count is dropped as MAE's fine-tuning does; without a head the count is needed
    _, replaced = vit_from_state_dict(fixture["state"], num_heads=2, num_classes=4)
    assert replaced["params"]["head"]["kernel"].shape == (32, 4)
    with pytest.raises(ValueError, match="has no head: give num_classes"):
        vit_from_state_dict(state, num_heads=2)


def test_positions_resized_for_other_token_counts(fixture):
    pos = fixture["state"]["pos_embed"]
    resized = resize_pos_embed(pos, 36)
    assert resized.shape == (1, 37, 32)
    np.testing.assert_array_equal(resized[:, 0], pos[:, 0])
    constant = np.concatenate([pos[:, :1], np.full((1, 16, 32), 0.25, np.float32)], axis=1)
    np.testing.assert_allclose(resize_pos_embed(constant, 64)[:, 1:], 0.25, atol=1e-6)
    model, variables = vit_from_state_dict(fixture["state"], num_heads=2, num_tokens=36)
    np.testing.assert_array_equal(variables["params"]["pos_embed"], resized)
    assert model.apply(variables, np.zeros((1, 36, 32), np.float32)).shape == (1, 10)
    with pytest.raises(ValueError, match="cannot resize pos_embed from 16 to 20 tokens"):
        vit_from_state_dict(fixture["state"], num_heads=2, num_tokens=20)


# ------------------------------------------------------------------------------------------------ model
def test_sizes_and_block_names():
    assert VIT_SIZES["B"] == (12, 768, 12)
    depth, width, heads = VIT_SIZES["Ti"]
    model = ViT(num_tokens=256, width=width, depth=depth, num_heads=heads, num_classes=1000, global_pool="avg")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 256, width), jnp.float32))
    paths = {"/".join(p) for p in traverse_util.flatten_dict(shapes["params"])}
    assert {f"blocks_{i}/attn/qkv/kernel" for i in range(depth)} <= paths
    assert "fc_norm/scale" in paths and "norm/scale" not in paths


def test_drop_path_only_in_training(fixture):
    model, variables = load_official_vit(fixture["root"] / "vit.pth", num_heads=2, drop_path_rate=0.5)
    x = np.tile(fixture["token_embeddings"], (8, 1, 1))
    evaluated = model.apply(variables, x)
    np.testing.assert_allclose(evaluated, np.tile(fixture["logits"], (8, 1)), rtol=1e-5, atol=1e-5)
    first = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    again = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(first, again)
    assert np.abs(np.asarray(first) - np.asarray(evaluated)).max() > 1e-3
    samples = np.asarray(drop_path(jnp.ones((20000, 1, 1)), 0.3, jax.random.key(0)))
    np.testing.assert_allclose(np.unique(samples), [0.0, 1 / 0.7], rtol=1e-6)
    assert abs((samples == 0).mean() - 0.3) < 0.02


# ------------------------------------------------------------------------------------------------ errors
def test_mismatched_checkpoint_lists_every_key(fixture):
    state = dict(fixture["state"])
    del state["blocks.1.norm2.bias"]
    state["blocks.0.ls1.gamma"] = np.ones(32, np.float32)
    state["blocks.0.attn.qkv.bias"] = np.zeros(64, np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        vit_from_state_dict(state, num_heads=2, source="mae.pth")
    message = str(err.value)
    assert message.startswith("mae.pth")
    assert "blocks_1/norm2/bias" in message
    assert "blocks.0.ls1.gamma" in message
    assert "blocks.0.attn.qkv.bias: (64,)" in message


def test_bad_arguments_are_named(fixture):
    with pytest.raises(ValueError, match="width 32 is not divisible by num_heads=3"):
        vit_from_state_dict(fixture["state"], num_heads=3)
    with pytest.raises(CheckpointMismatchError, match="missing pos_embed"):
        vit_from_state_dict({k: v for k, v in fixture["state"].items() if k != "pos_embed"}, num_heads=2)
    model, variables = vit_from_state_dict(fixture["state"], num_heads=2)
    with pytest.raises(ValueError, match=r"expected token embeddings \[B, 16, 32\], got \(2, 15, 32\)"):
        model.apply(variables, np.zeros((2, 15, 32), np.float32))
    with pytest.raises(ValueError, match="global_pool 'max'"):
        model = ViT(num_tokens=4, width=8, depth=1, num_heads=2, global_pool="max")
        model.init(jax.random.key(0), jnp.zeros((1, 4, 8)))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_official_vit(fixture["root"] / "missing.pth", num_heads=2)
