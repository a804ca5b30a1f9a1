"""GPT: parity with the release's minGPT (gpt_tiny fixture) and LlamaGen's backbone (FAR fixture), the loader's
errors, and the KV-cache decode against the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import relative_error
from vqlc_jax import losses
from vqlc_jax.convert.torch_layout import CheckpointMismatchError, default_path, map_state_dict
from vqlc_jax.generators import OFFICIAL_LOADERS, load_official
from vqlc_jax.models.gpt import GPT, rope_table_2d


@pytest.fixture(scope="module")
def gpt_tiny(fixtures_dir):
    root = fixtures_dir / "official_generators"
    with np.load(root / "gpt_tiny.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["state_dict"] = {k.removeprefix("state_dict/"): v for k, v in arrays.items() if k.startswith("state_dict/")}
    arrays["root"] = root
    return arrays


def _load(source):
    return load_official("gpt", source, num_heads=2, num_classes=10)


@pytest.mark.parametrize("suffix", ["pth", "npz"])
def test_release_parity(gpt_tiny, suffix):
    model, variables = _load(gpt_tiny["root"] / f"gpt_tiny.{suffix}")
    assert (model.num_codes, model.num_layers, model.width, model.block_size) == (300, 2, 32, 17)
    idx = jnp.asarray(gpt_tiny["idx"], jnp.int32)
    logits = model.apply(variables, idx)
    logits_train = model.apply(variables, idx[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_train, idx[:, 1:]).mean()
    errors = {"logits": relative_error(logits, gpt_tiny["logits"]),
              "logits_train": relative_error(logits_train, gpt_tiny["logits_train"]),
              "loss": relative_error(loss, gpt_tiny["loss"])}
    print(f"gpt_tiny.{suffix} relative errors:", errors)
    assert max(errors.values()) < 1e-5


def test_chunked_loss_matches_release(gpt_tiny):
    """The trainer's loss on `hidden` and the head kernel: the release's plain and label-smoothed cross-entropy."""
    if not hasattr(losses, "chunked_softmax_cross_entropy"):
        pytest.skip("vqlc_jax.losses.chunked_softmax_cross_entropy not in this tree yet")
    model, variables = _load(gpt_tiny["state_dict"])
    idx = jnp.asarray(gpt_tiny["idx"], jnp.int32)
    features = model.apply(variables, idx[:, :-1], method=GPT.hidden).reshape(-1, model.width)
    kernel, targets = variables["params"]["head"]["kernel"], idx[:, 1:].reshape(-1)
    plain = losses.chunked_softmax_cross_entropy(features, kernel, targets, chunk_size=128)
    smooth = losses.chunked_softmax_cross_entropy(features, kernel, targets, chunk_size=128, label_smoothing=0.1)
    errors = {"loss": relative_error(plain, gpt_tiny["loss"]),
              "loss_label_smooth": relative_error(smooth, gpt_tiny["loss_label_smooth"])}
    print("chunked loss relative errors:", errors)
    assert max(errors.values()) < 1e-5


def test_stage2_checkpoint_layout(gpt_tiny):
    """`module.transformer.*` beside `module.vqgan.*` (a deepspeed stage-2 checkpoint) reads like the flat dict."""
    stage2 = {f"module.transformer.{k}": v for k, v in gpt_tiny["state_dict"].items()}
    stage2["module.vqgan.quant_conv.weight"] = np.zeros((8, 8, 1, 1), np.float32)
    model, variables = _load(stage2)
    idx = jnp.asarray(gpt_tiny["idx"], jnp.int32)
    assert relative_error(model.apply(variables, idx), gpt_tiny["logits"]) < 1e-5


def test_bad_checkpoint_lists_every_problem(gpt_tiny):
    state = dict(gpt_tiny["state_dict"])
    del state["blocks.1.ln2.bias"]
    state["blocks.0.attn.extra.weight"] = np.zeros((32, 32), np.float32)
    state["ln_f.weight"] = np.ones(31, np.float32)
    state["blocks.0.attn.mask"] = np.ones((1, 1, 17, 17), np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        _load(state)
    message = str(err.value)
    for expected in ("blocks_1/ln2/bias", "blocks.0.attn.extra.weight", "ln_f.weight: (31,)",
                     "blocks.0.attn.mask", "not lower-triangular"):
        assert expected in message, message


def test_loader_size_and_kind_errors(gpt_tiny):
    with pytest.raises(ValueError, match="num_classes=310"):
        load_official("gpt", gpt_tiny["state_dict"], num_heads=2, num_classes=310)
    with pytest.raises(ValueError, match="num_heads=3"):
        load_official("gpt", gpt_tiny["state_dict"], num_heads=3, num_classes=10)
    state = {k: v for k, v in gpt_tiny["state_dict"].items() if k != "pos_emb"}
    with pytest.raises(CheckpointMismatchError, match="pos_emb"):
        _load(state)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        _load("nowhere.pth")
    for kind in ("dit", "sit", "ldm", "fqgan", "far"):
        if OFFICIAL_LOADERS[kind] is None:
            with pytest.raises(NotImplementedError, match=kind):
                load_official(kind, {})
    with pytest.raises(ValueError, match="'vae'"):
        load_official("vae", {})


def test_llamagen_backbone_matches_far_release(fixtures_dir):
    """The llamagen variant's blocks and final norm against the FAR release's main transformer
    (`gen_tf_context`, before its final RMSNorm): inputs are the aggregated FAR embeddings, put in the code table."""
    with np.load(fixtures_dir / "official_fqgan" / "far_dual_tiny.npz") as data:
        ref = {k: data[k] for k in data.files}
    sd = {k.removeprefix("state_dict/"): v for k, v in ref.items() if k.startswith("state_dict/")}
    np.testing.assert_allclose(rope_table_2d(4, 16), ref["freqs_cis"], atol=1e-6)
    pairs = np.concatenate([sd["tok_embeddings_1.weight"][ref["idx_1"]], sd["tok_embeddings_2.weight"][ref["idx_2"]]],
                           -1)
    inputs = (pairs @ sd["aggregation_layer.weight"].T + sd["aggregation_layer.bias"])[:, :-1].reshape(-1, 32)
    num_codes = len(inputs)
    model = GPT(num_codes=num_codes, num_classes=10, block_size=17, num_layers=2, num_heads=2, width=32,
                variant="llamagen", multiple_of=32)
    state = {k: v for k, v in sd.items() if k.startswith(("layers.", "norm."))}
    state.update({"tok_embeddings.embedding": inputs, "cls_embedding.embedding":
                  sd["cls_embedding.embedding_table.weight"], "head.weight": np.zeros((num_codes, 32), np.float32)})
    template = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16), jnp.int32))
    variables = map_state_dict(state, template, key_to_path=lambda k: (
        ("params", k.split(".")[0], "embedding") if k.endswith(".embedding") else default_path(k)))
    context = ref["gen_tf_context"].astype(np.float64)  # rows: 3 conditional, then 3 null-class
    want = context / np.sqrt((context ** 2).mean(-1, keepdims=True) + 1e-5) * sd["norm.weight"]
    codes = np.arange(num_codes).reshape(3, 15)
    errors = []
    for labels, rows in ((ref["cond_idx"], slice(0, 3)), (np.full(3, 10), slice(3, 6))):
        idx = jnp.asarray(np.concatenate([(num_codes + labels)[:, None], codes], 1), jnp.int32)
        errors.append(relative_error(model.apply(variables, idx, method=GPT.hidden), want[rows]))
    print("llamagen backbone vs FAR release relative errors:", errors)
    assert max(errors) < 1e-5


def _random_model(variant, *, null_class=True, dtype=jnp.float32, remat=False, seed=0):
    model = GPT(num_codes=40, num_classes=5, block_size=17, num_layers=2, num_heads=2, width=32, variant=variant,
                null_class=null_class, dtype=dtype, remat=remat, multiple_of=32)
    params = model.init(jax.random.key(seed), jnp.zeros((1, 17), jnp.int32))
    # O(1) weights everywhere (the inits leave heads and positions trivial)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + jax.random.normal(k, x.shape) / np.sqrt(x.shape[0] if x.ndim == 2 else 4)
              for x, k in zip(leaves, keys)]
    return model, jax.tree.unflatten(tree, leaves)


def _sequence(model, batch=3, seed=2):
    labels = jax.random.randint(jax.random.key(seed), (batch, 1), 0, model.num_classes + int(model.null_class))
    codes = jax.random.randint(jax.random.key(seed + 1), (batch, model.block_size - 1), 0, model.num_codes)
    return jnp.concatenate([model.num_codes + labels, codes], 1)


@pytest.mark.parametrize("variant", ["mingpt", "llamagen"])
def test_cache_decode_equals_full_forward(variant):
    model, variables = _random_model(variant)
    idx = _sequence(model)
    full = model.apply(variables, idx)
    assert full.shape == (3, 17, model.output_size)
    step = jax.jit(lambda ids, pos, cache: model.apply(variables, ids, pos, cache, method="decode_step"))
    cache = model.init_cache(3)
    errors = []
    for position in range(model.block_size):
        logits, cache = step(idx[:, position], jnp.int32(position), cache)
        errors.append(relative_error(logits, full[:, position]))
    print(f"{variant} cache vs full forward, worst position:", max(errors))
    assert max(errors) < 1e-5


@pytest.mark.parametrize("variant", ["mingpt", "llamagen"])
def test_bf16_remat_and_hidden(variant):
    model, variables = _random_model(variant)
    idx = _sequence(model)
    want = model.apply(variables, idx)
    hidden = model.apply(variables, idx, method=GPT.hidden)
    np.testing.assert_allclose(hidden @ variables["params"]["head"]["kernel"], want, rtol=1e-5, atol=1e-5)
    remat = model.clone(remat=True)
    assert relative_error(remat.apply(variables, idx, train=True), want) < 1e-6
    bf16 = model.clone(dtype=jnp.bfloat16)
    assert jax.tree.map(lambda x: x.dtype, bf16.init(jax.random.key(0), idx)) == jax.tree.map(
        lambda x: x.dtype, variables)
    got = bf16.apply(variables, idx)
    assert got.dtype == jnp.bfloat16
    assert relative_error(got, want) < 5e-2


def test_config_errors():
    with pytest.raises(ValueError, match="variant='llama'"):
        GPT(num_codes=4, num_classes=2, block_size=5, num_layers=1, num_heads=1, width=8, variant="llama")
    with pytest.raises(ValueError, match="block_size - 1 = 5"):
        GPT(num_codes=4, num_classes=2, block_size=6, num_layers=1, num_heads=1, width=8, variant="llamagen")
    with pytest.raises(ValueError, match="num_heads=3"):
        GPT(num_codes=4, num_classes=2, block_size=5, num_layers=1, num_heads=3, width=8)
    model = GPT(num_codes=4, num_classes=2, block_size=5, num_layers=1, num_heads=1, width=8, null_class=True)
    assert (model.vocab_size, model.output_size) == (7, 7)
    assert model.clone(variant="llamagen").output_size == 4
