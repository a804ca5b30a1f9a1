"""FAR: parity with the FQGAN release (`far_dual_tiny`: training logits and loss, RoPE table, the cached CFG
sampler teacher-forced and greedy), the cache against the full forward for k = 3 sub-codebooks of unequal sizes,
the sampler's determinism, sharding and filters, checkpoint errors, and the family on k-sub-codebook encoded
datasets (encode job, reader checks, training, export, per-sub-codebook utilization, bad inputs)."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PROJECT_ROOT, override, read_metrics, relative_error

from vqlc_jax import Tokenizer, parallel
from vqlc_jax.convert.torch_layout import CheckpointMismatchError
from vqlc_jax.data.encoded import open_encoded
from vqlc_jax.generators import load_official
from vqlc_jax.generators.encode import encode_dataset
from vqlc_jax.generators.evaluate import evaluate_generated
from vqlc_jax.metrics import Unavailable
from vqlc_jax.generators.far import FARFamily, decode_far, far_loss, sample_far_tokens
from vqlc_jax.generators.generator import Generator
from vqlc_jax.models.far import FAR, stack_tokens
from vqlc_jax.models.gpt import rope_table_2d
from vqlc_jax.models.build import build_model
from vqlc_jax.train.generator import train_and_evaluate

sys.path.insert(0, str(PROJECT_ROOT))
from configs import far_demo  # noqa: E402
from configs.encode import demo as encode_demo  # noqa: E402


# ---- Release parity. -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def release(fixtures_dir):
    """The `far_dual_tiny` fixture: (model, variables) read from its `.pth`, and its arrays."""
    root = fixtures_dir / "official_fqgan"
    with np.load(root / "far_dual_tiny.npz") as data:
        ref = {k: data[k] for k in data.files}
    model, variables = load_official("far", root / "far_dual_tiny.pth", num_heads=2, num_tokens=16)
    return model, variables, ref


def test_release_training_forward_and_loss(release):
    model, variables, ref = release
    assert (model.codebook_sizes, model.num_classes, model.num_layers, model.head_layers) == ((64, 64), 10, 2, 2)
    labels = jnp.asarray(ref["cond_idx_effective"], jnp.int32)  # the training forward's labels after token_drop
    tokens = np.stack([ref["idx_1"], ref["idx_2"]], 1)
    logits = jax.jit(model.apply)(variables, labels, tokens)
    np.testing.assert_array_equal(stack_tokens([ref["idx_1"], ref["idx_2"]]), tokens)  # the release's idx list
    loss, terms = jax.jit(lambda p, t: far_loss(model, p, labels, t, chunk_size=24))(variables["params"], tokens)
    errors = {"logits_1": relative_error(logits[0], ref["logits_1"]),
              "logits_2": relative_error(logits[1], ref["logits_2"]),
              "loss": relative_error(loss, ref["loss"]), "loss_1": relative_error(terms[0], ref["loss_1"]),
              "loss_2": relative_error(terms[1], ref["loss_2"]),
              "freqs_cis": relative_error(model.rope(), ref["freqs_cis"])}
    print("FAR release training forward, relative errors:", errors)
    assert max(errors.values()) < 1e-5
    np.testing.assert_array_equal(rope_table_2d(4, 16)[0], 0)  # the class slot's q and k are zeroed


def test_release_cached_cfg_sampler(release):
    """The cached loop with guidance 2.0 on both sub-tokens: teacher-forced (tokens forced to idx_1 / idx_2) and
    greedy (argmax), against `generate_fq`."""
    model, variables, ref = release
    forced = jnp.asarray(np.stack([ref["idx_1"], ref["idx_2"]], 1), jnp.int32)
    run = jax.jit(lambda labels, rule: decode_far(model, variables, labels, num_tokens=16, cfg_scale=2.0,
                                                  choose=rule, trace=True), static_argnums=1)
    labels = jnp.asarray(ref["cond_idx"], jnp.int32)
    tokens, record = run(labels, lambda t, j, logits: forced[:, j, t])
    np.testing.assert_array_equal(tokens, forced)
    errors = {"gen_tf_context": relative_error(record["context"], ref["gen_tf_context"])}
    for j in (1, 2):
        errors[f"gen_tf_raw_logits_{j}"] = relative_error(record[f"raw_{j}"], ref[f"gen_tf_raw_logits_{j}"])
        errors[f"gen_tf_logits_{j}"] = relative_error(record[f"logits_{j}"], ref[f"gen_tf_logits_{j}"])
    tokens, record = run(labels, lambda t, j, logits: jnp.argmax(logits, -1))
    for j in (1, 2):
        np.testing.assert_array_equal(tokens[:, j - 1], ref[f"gen_greedy_tokens_{j}"])
        errors[f"gen_greedy_logits_{j}"] = relative_error(record[f"logits_{j}"], ref[f"gen_greedy_logits_{j}"])
    print("FAR release sampler, relative errors (greedy tokens identical):", errors)
    assert max(errors.values()) < 1e-5


def test_checkpoint_errors_name_the_problem(release):
    _, _, ref = release
    state = {k.removeprefix("state_dict/"): v for k, v in ref.items() if k.startswith("state_dict/")}
    with pytest.raises(ValueError, match="num_classes=12"):
        load_official("far", state, num_heads=2, num_tokens=16, num_classes=12)
    with pytest.raises(ValueError, match="num_heads=3"):
        load_official("far", state, num_heads=3, num_tokens=16)
    bad = dict(state, **{"output_2.weight": np.zeros((63, 32), np.float32), "ar_head.0.extra.weight": np.zeros(1)})
    del bad["ar_head.1.ffn_norm.weight"]
    with pytest.raises(CheckpointMismatchError) as err:
        load_official("far", bad, num_heads=2, num_tokens=16)
    for expected in ("output_2.weight: (63, 32)", "ar_head.0.extra.weight", "ar_head_1/ffn_norm/scale"):
        assert expected in str(err.value), str(err.value)
    with pytest.raises(CheckpointMismatchError, match="tok_embeddings_1"):
        load_official("far", {k: v for k, v in state.items() if not k.startswith("tok_embeddings")}, num_heads=2)


def random_variables(shapes, seed: int = 0):
    """Variables of the given shapes, N(0, 1 / fan-in) (fan-in: the second-last axis; 4 for vectors), drawn with
    numpy: no compilation of an init."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) / np.sqrt(
        x.shape[-2] if len(x.shape) >= 2 else 4)), shapes)


# ---- Cache, sampler. -------------------------------------------------------------------------------------------------
SIZES = (40, 24, 56)


@pytest.fixture(scope="module")
def triple():
    """A random FAR over 3 sub-codebooks of unequal sizes, O(1) weights everywhere (heads not zero)."""
    model = FAR(codebook_sizes=SIZES, num_classes=5, block_size=17, num_layers=2, num_heads=2, width=32,
                head_layers=2, multiple_of=32, zero_head=False)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 3, 16), jnp.int32))
    return model, random_variables(shapes)


def test_cached_decoding_equals_the_full_forward_for_three_sub_codebooks(triple):
    model, variables = triple
    labels = jnp.array([0, 3, 4], jnp.int32)
    tokens = jnp.stack([jax.random.randint(jax.random.key(j), (3, 16), 0, n) for j, n in enumerate(SIZES)], 1)
    both = jax.jit(jax.vmap(model.apply, (None, 0, None)))(variables, jnp.stack([labels, jnp.full_like(labels, 5)]),
                                                            tokens)
    full, null = [logits[0] for logits in both], [logits[1] for logits in both]
    _, record = jax.jit(lambda: decode_far(model, variables, labels, num_tokens=16, cfg_scale=1.5, trace=True,
                                           choose=lambda t, j, logits: tokens[:, j, t]))()
    errors = []
    for j in range(3):
        assert full[j].shape == (3, 16, SIZES[j])
        errors.append(relative_error(record[f"raw_{j + 1}"], jnp.concatenate([full[j], null[j]])))
        errors.append(relative_error(record[f"logits_{j + 1}"], null[j] + 1.5 * (full[j] - null[j])))
    print("FAR (k = 3) cache vs full forward, worst:", max(errors))
    assert max(errors) < 1e-5


def test_sampler_is_deterministic_sharded_and_filters():
    model = FAR(codebook_sizes=SIZES[:2], num_classes=5, block_size=17, num_layers=1, num_heads=2, width=16,
                head_layers=1, multiple_of=16, zero_head=False)  # small: three compilations
    variables = random_variables(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,), jnp.int32),
                                                jnp.zeros((1, 2, 16), jnp.int32)))
    labels = jnp.arange(8, dtype=jnp.int32) % 5
    sample = jax.jit(lambda rng, labels, **kw: sample_far_tokens(model, variables, rng, labels, num_tokens=16,
                                                                 cfg_scale=2.0, **kw), static_argnames=("top_k",))
    tokens = sample(jax.random.key(0), labels)
    assert tokens.shape == (8, 2, 16) and tokens.dtype == jnp.int32
    for j, n in enumerate(SIZES[:2]):
        assert 0 <= int(tokens[:, j].min()) and int(tokens[:, j].max()) < n
    np.testing.assert_array_equal(sample(jax.random.key(0), labels), tokens)
    assert (sample(jax.random.key(1), labels) != tokens).any()
    sharded = jax.device_put(labels, parallel.batch_sharding(parallel.make_mesh()))
    np.testing.assert_array_equal(sample(jax.random.key(0), sharded), tokens)
    top_1 = sample(jax.random.key(3), labels, top_k=1)  # only the argmax survives: any seed draws it
    np.testing.assert_array_equal(sample(jax.random.key(4), labels, top_k=1), top_1)
    assert (top_1 != tokens).any()
    with pytest.raises(ValueError, match="top_k=30"):
        sample_far_tokens(model, variables, jax.random.key(0), labels, num_tokens=16, top_k=30)  # > 24 codes
    with pytest.raises(ValueError, match="num_tokens=17"):
        sample_far_tokens(model, variables, jax.random.key(0), labels, num_tokens=17)


# ---- The family on encoded datasets of k sub-codebooks. --------------------------------------------------------------
DDCONFIG = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=16, resolution=16,
                in_channels=3, out_ch=3, dropout=0.0, double_z=False)
VISUAL, SEMANTIC = 50, 37


@pytest.fixture(scope="module")
def dual(tmp_path_factory):
    """16 bundled crops encoded by a random tiny FQGAN-Dual tokenizer (16 px, visual and semantic sub-codebooks of
    50 and 37 codes) into [2, 8, 8] maps (2 shards); yields the encoded folder while `Tokenizer.load` gives that
    tokenizer (the encode job and the trainer load it; kept in memory, weights drawn without compiling an init)."""
    root = tmp_path_factory.mktemp("far")
    (root / "tokenizer").mkdir()
    branches = [{"name": name, "quantizer": {"name": "vq", "num_codes": n}}
                for name, n in (("vis", VISUAL), ("sem", SEMANTIC))]
    config = {"ddconfig": DDCONFIG, "embed_dim": 4, "quantizer": {"name": "fq", "branches": branches},
              "fq": {"adapter_layers": 1, "adapter_heads": 2}}
    tokenizer = Tokenizer(config, random_variables(jax.eval_shape(
        build_model(config).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))))
    assert tokenizer.codebook_sizes == (VISUAL, SEMANTIC)
    encode = encode_demo.get_config().unlock()
    encode.data.update(resolution=16, options={"resolution": 16}, max_images=16)
    encode.encode.update(flip=False, global_batch_size=8, images_per_shard=8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Tokenizer, "load", classmethod(lambda cls, directory: tokenizer))
        encode_dataset(encode, root / "tokenizer", root / "data")
        yield root / "data"


def test_encode_job_and_reader_keep_the_sub_codebooks(dual, tmp_path):
    data = open_encoded(dual)
    assert data.token_shape == (2, 8, 8) and data.num_codebooks == 2 and data.codebook_sizes == (VISUAL, SEMANTIC)
    assert data.latent_shape == (8, 8, 8)  # the two branches' 4 channels
    tokens = data.read("tokens", np.arange(data.num_images))
    assert tokens.shape == (16, 2, 8, 8) and tokens[:, 0].max() < VISUAL and tokens[:, 1].max() < SEMANTIC
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in dual.iterdir():
        (bad / path.name).symlink_to(path)
    shard = json.loads((dual / "manifest.json").read_text())["shards"][1]["tokens"]["file"]
    (bad / shard).unlink()
    broken = np.load(dual / shard)
    broken[3, 1, 2, 2] = SEMANTIC  # in range of the visual codebook, not of the semantic one
    np.save(bad / shard, broken)
    with pytest.raises(ValueError, match=rf"{shard}.*index {SEMANTIC} of sub-codebook 2 of 2, outside \[0, 37\)"):
        open_encoded(bad)


def smoke_config(encoded_dir, **overrides):
    return override(far_demo.get_config("smoke"), **{"data.encoded_dir": str(encoded_dir), **overrides})


@pytest.mark.parametrize("key, value, message", [
    ("model.num_codebooks", 3, "config.model.num_codebooks=3 does not match the 2 sub-codebook"),
    ("model.codebook_sizes", (50, 50), r"config.model.codebook_sizes=\(50, 50\) does not match the sub-codebook "
                                       r"sizes \(50, 37\)"),
    ("model.num_classes", 9, "config.model.num_classes=9 does not match the 8")])
def test_config_that_does_not_fit_the_dataset_is_named(dual, key, value, message):
    with pytest.raises(ValueError, match=message):
        FARFamily(smoke_config(dual, **{key: value}), open_encoded(dual))


def test_gpt_refuses_sub_codebook_maps(dual):
    from vqlc_jax.generators.family import make_family
    from vqlc_jax.generators.config import base_config

    config = override(base_config("gpt"), **{"data.encoded_dir": str(dual)})
    with pytest.raises(ValueError, match="2 sub-codebooks.*generator='far'"):
        make_family(config, open_encoded(dual))


def test_utilization_per_sub_codebook():
    tokens = np.zeros((2, 2, 4, 4), np.int32)
    tokens[0, 0, 0, :2] = [1, 2]  # visual: codes 0, 1, 2 of 10; semantic: code 0 of 4
    images = np.zeros((2, 8, 8, 3), np.float32)
    evaluate = lambda tokens: evaluate_generated(  # noqa: E731
        [(images, tokens)], fid=Unavailable("fid", "not needed"), reference=None, reference_features=None,
        num_codes=(10, 4))
    s = evaluate(tokens).scalars
    assert [s["utilization_1"], s["utilization_2"], s["utilization"]] == pytest.approx([0.3, 0.25, 4 / 14])
    assert s["perplexity_2"] == pytest.approx(1.0)
    tokens[1, 1, 0, 0] = 4
    with pytest.raises(ValueError, match=r"values of sub-codebook 2 span \[0, 4\], outside the codebook \[0, 4\)"):
        evaluate(tokens)


@pytest.mark.slow
def test_far_trains_on_dual_maps_samples_and_exports(dual, tmp_path):
    result = train_and_evaluate(smoke_config(dual), tmp_path)
    assert result["status"] == "done" and result["step"] == 4
    for m in read_metrics(tmp_path).values():  # a fresh FAR (zero heads) predicts uniformly: log V_j per head
        assert abs(m["loss_1"] - np.log(VISUAL)) < 0.5 and abs(m["loss_2"] - np.log(SEMANTIC)) < 0.5
        assert m["loss"] == pytest.approx((m["loss_1"] + m["loss_2"]) / 2, rel=1e-5)
    assert 0 < result["eval/gen_utilization_1"] <= 1 and 0 < result["eval/gen_utilization_2"] <= 1
    assert (tmp_path / "samples_0000004.png").is_file()
    generator = Generator.load(tmp_path / "generator")
    labels = np.array([0, 7, 7], np.int32)
    tokens = generator.sample(jax.random.key(0), labels)
    assert tokens.shape == (3, 2, 8, 8) and tokens[:, 1].max() < SEMANTIC
    np.testing.assert_array_equal(generator.sample(jax.random.key(0), labels), tokens)
    assert generator.generate(jax.random.key(0), labels).shape == (3, 16, 16, 3)
