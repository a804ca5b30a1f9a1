"""The token-map classifier (`vqlc_jax.train.classifier`): MAE's layer-wise lr decay and weight-decay mask, the two
token embeddings (the frozen codebook never trained), `load_official("vit")` on given token embeddings, a short run
on a separable toy encoded by a tiny `lc` tokenizer (learns, evaluates top-1/top-5 on the held-out split, writes
eval.json), preemption and resume, MAE initialisation, and errors naming what is wrong."""

import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import PROJECT_ROOT, StopAt, override, read_metrics, relative_error
from flax.traverse_util import flatten_dict
from PIL import Image

from vqlc_jax import Tokenizer
from vqlc_jax.convert.torch_layout import CheckpointMismatchError
from vqlc_jax.generators import load_official
from vqlc_jax.generators.encode import encode_dataset
from vqlc_jax.models.token_classifier import TokenClassifier
from vqlc_jax.models.vqgan import build_vqgan
from vqlc_jax.models.vit import ViT
from vqlc_jax.train import classifier
from vqlc_jax.train.classifier import ClassifierTask, layer_decay_scales, layer_id, train_and_evaluate

sys.path.insert(0, str(PROJECT_ROOT))
from configs import classify_demo  # noqa: E402
from configs.encode import demo as encode_demo  # noqa: E402

DDCONFIG = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=16, resolution=16,
                in_channels=3, out_ch=3, dropout=0.0, double_z=False)
NUM_CODES, CODE_DIM = 64, 12
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 200)]  # one class each


# ----------------------------------------------------------------------------------------------------------------------
# A separable toy: noisy flat colours encoded by a random `lc` tokenizer (8x8 token maps)
# ----------------------------------------------------------------------------------------------------------------------
def write_images(root, split: str, per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    for label, colour in enumerate(COLOURS):
        folder = root / split / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = np.clip(np.array(colour) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{i:03d}.png")


def random_lc_tokenizer() -> Tokenizer:
    """A tiny random `lc` tokenizer at 16 px, its weights drawn in numpy (fan-in scaled; no init compilation)."""
    config = {"ddconfig": DDCONFIG, "embed_dim": 4,
              "quantizer": {"name": "lc", "num_codes": NUM_CODES, "codebook_dim": CODE_DIM}}
    images = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    abstract = jax.eval_shape(build_vqgan(ml_collections.ConfigDict(config)).init, jax.random.key(0), images)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        fill = {"scale": np.ones, "bias": np.zeros}.get(path[-1].key)
        if fill:
            return fill(leaf.shape, leaf.dtype)
        return rng.normal(0, np.prod(leaf.shape[:-1]) ** -0.5 if leaf.ndim > 1 else 1, leaf.shape).astype(leaf.dtype)

    return Tokenizer(config, jax.tree_util.tree_map_with_path(draw, abstract))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """{train, held_out, tokenizer}: 4 colour classes, 16 train images per class (and mirror images) and 6
    held-out, encoded by one tiny `lc` tokenizer."""
    root = tmp_path_factory.mktemp("toy")
    write_images(root / "images", "train", 16, seed=0)
    write_images(root / "images", "validation", 6, seed=1)
    random_lc_tokenizer().save(root / "tokenizer")
    for split, out, flip in (("train", "train", True), ("validation", "held_out", False)):
        config = encode_demo.get_config()
        config.unlock()
        config.data.update(name="folder", split=split, resolution=16)
        config.data.options = {"root": str(root / "images")}
        config.encode.update(flip=flip, global_batch_size=16, images_per_shard=64)
        encode_dataset(config, root / "tokenizer", root / out)
    return {"train": root / "train", "held_out": root / "held_out", "tokenizer": root / "tokenizer"}


def toy_config(toy, **overrides):
    return override(classify_demo.get_config("smoke"), **{
        "data.encoded_dir": str(toy["train"]), "data.eval_encoded_dir": str(toy["held_out"]),
        "total_steps": 24, "log_every_steps": 6, "checkpoint_every_steps": 24, "eval_every_steps": 24,
        "optimizer.lr": 3e-3, **overrides})


@pytest.fixture(scope="module")
def uninterrupted(toy, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("classify")
    return workdir, train_and_evaluate(toy_config(toy), workdir)


# ----------------------------------------------------------------------------------------------------------------------
# Layer-wise lr decay and weight decay
# ----------------------------------------------------------------------------------------------------------------------
def vit_b_params():
    backbone = ViT(num_tokens=256, width=768, depth=12, num_heads=12, num_classes=1000, global_pool="avg")
    model = TokenClassifier(100, "learned", backbone)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16), jnp.int32))["params"]


def test_layer_ids_and_scales_follow_mae():
    assert layer_id(("backbone", "blocks_0", "attn", "qkv", "kernel"), 12) == 1
    assert layer_id(("backbone", "blocks_11", "mlp", "fc2", "bias"), 12) == 12
    for path in (("token_embed", "embedding"), ("backbone", "cls_token"), ("backbone", "pos_embed")):
        assert layer_id(path, 12) == 0
    for path in (("backbone", "fc_norm", "scale"), ("backbone", "head", "kernel"), ("backbone", "norm", "bias")):
        assert layer_id(path, 12) == 13
    scales = {"/".join(p): s for p, s in flatten_dict(layer_decay_scales(vit_b_params(), 12, 0.65)).items()}
    assert scales["backbone/head/kernel"] == scales["backbone/fc_norm/scale"] == 1.0
    np.testing.assert_allclose(scales["backbone/blocks_11/attn/qkv/kernel"], 0.65)
    np.testing.assert_allclose(scales["backbone/blocks_0/norm1/scale"], 0.65 ** 12)
    for name in ("token_embed/embedding", "backbone/pos_embed", "backbone/cls_token"):
        np.testing.assert_allclose(scales[name], 0.65 ** 13)
    assert set(flatten_dict(layer_decay_scales(vit_b_params(), 12, 1.0)).values()) == {1.0}


def test_weight_decay_mask_and_scaled_updates():
    params = vit_b_params()
    mask = {"/".join(p): m for p, m in flatten_dict(classifier.weight_decay_mask(params)).items()}
    assert mask["backbone/blocks_3/attn/qkv/kernel"] and mask["token_embed/embedding"] and mask["backbone/head/kernel"]
    assert not any(mask[k] for k in ("backbone/cls_token", "backbone/pos_embed", "backbone/blocks_3/attn/qkv/bias",
                                     "backbone/fc_norm/scale"))
    # The optimiser's update of each parameter is its layer's scale times the unscaled one (lr and weight decay).
    tiny = {"a": {"blocks_0": {"w": jnp.ones((2, 2))}}, "head": {"kernel": jnp.ones((2, 2))}}
    opt = classifier.base_config().optimizer
    opt.update(warmup_steps=0, layer_decay=0.5)
    scales = layer_decay_scales(tiny, 1, 0.5)

    def first_update(layer_scales):
        optimizer = classifier.make_optimizer(opt, 10, layer_scales)
        return optimizer.update(jax.tree.map(jnp.ones_like, tiny), optimizer.init(tiny), tiny)[0]

    scaled, unscaled = first_update(scales), first_update(jax.tree.map(lambda _: 1.0, scales))
    np.testing.assert_allclose(scaled["a"]["blocks_0"]["w"], 0.5 * unscaled["a"]["blocks_0"]["w"])
    np.testing.assert_allclose(scaled["head"]["kernel"], unscaled["head"]["kernel"])


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------
def test_load_official_vit_gives_features_and_logits_from_token_embeddings(fixtures_dir):
    with np.load(fixtures_dir / "vit_tiny" / "reference.npz") as data:
        ref = {k: data[k] for k in ("token_embeddings", "features", "pooled", "logits")}
    model, variables = load_official("vit", fixtures_dir / "vit_tiny" / "vit.pth", num_heads=2)
    for name, method in (("features", ViT.features), ("pooled", ViT.pooled), ("logits", ViT.__call__)):
        assert relative_error(model.apply(variables, ref["token_embeddings"], method=method), ref[name]) < 1e-5


def test_token_embeddings_and_the_frozen_codebook():
    backbone = ViT(num_tokens=4, width=8, depth=1, num_heads=2, num_classes=3, global_pool="avg")
    tokens = jnp.array([[[0, 5], [9, 5]]], jnp.int32)
    flat = np.array([[0, 5, 9, 5]])  # the tokens, row-major
    learned = TokenClassifier(10, "learned", backbone)
    variables = jax.jit(learned.init)(jax.random.key(0), tokens)
    table = variables["params"]["token_embed"]["embedding"]
    embedded = learned.apply(variables, tokens, method=TokenClassifier.embed)
    np.testing.assert_array_equal(embedded, np.asarray(table)[flat])

    rows = np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32)
    mapped = TokenClassifier(10, "codebook", backbone, codebook_dim=6)
    shapes = jax.eval_shape(mapped.init, jax.random.key(0), tokens)
    assert set(shapes) == {"params", "codebook"} and shapes["codebook"]["embedding"].shape == (10, 6)
    dense = {"kernel": jnp.asarray(np.random.default_rng(1).normal(size=(6, 8)), jnp.float32),
             "bias": jnp.full((8,), 0.5)}
    params = {**variables["params"], "token_embed": dense}
    frozen = {"codebook": {"embedding": jnp.asarray(rows)}}
    want = rows[flat] @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
    got = mapped.apply({"params": params, **frozen}, tokens, method=TokenClassifier.embed)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # One training step moves the linear map and leaves the codebook as it was (it is no parameter).
    optimizer = optax.adam(1e-2)
    state = classifier.ClassifierState(step=jnp.zeros((), jnp.int32), params=params,
                                       opt_state=optimizer.init(params), rng=jax.random.key(1))
    step = jax.jit(lambda s, b, f: classifier.train_step(mapped, optimizer, 0.1, s, b, f))
    new, metrics = step(state, {"tokens": tokens, "label": jnp.array([2])}, frozen)
    assert np.isfinite(metrics["loss"]) and int(new.step) == 1
    assert np.abs(new.params["token_embed"]["kernel"] - dense["kernel"]).max() > 0
    np.testing.assert_array_equal(frozen["codebook"]["embedding"], rows)
    with pytest.raises(ValueError, match=r"token maps \[B, h, w\] with h\*w = 4"):
        learned.apply(variables, jnp.zeros((1, 3, 3), jnp.int32))
    with pytest.raises(ValueError, match="embedding 'clip'"):
        TokenClassifier(10, "clip", backbone).init(jax.random.key(0), tokens)


# ----------------------------------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------------------------------
def test_short_run_learns_and_reports_top1_top5(toy, uninterrupted):
    workdir, result = uninterrupted
    assert result["status"] == "done" and result["step"] == 24
    losses = [m["loss"] for _, m in sorted(read_metrics(workdir).items())]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses
    report = json.loads((workdir / "eval.json").read_text())
    assert report["num_images"] == 24 and report["num_classes"] == 4 and report["step"] == 24
    assert report["top1"] > 0.5 and report["top5"] == 1.0  # chance: 0.25; 4 classes: top-5 is every class
    assert report["top1"] == result["eval/top1"] and report["embedding"] == "codebook"
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1] == {"step": 24, **{k: result[k] for k in ("eval/loss", "eval/top1", "eval/top5")}}
    assert "top-1 (%)" in (workdir / "eval.md").read_text()


@pytest.mark.slow
def test_preempted_run_resumes_to_the_same_losses(toy, uninterrupted, tmp_path):
    reference = read_metrics(uninterrupted[0])
    first = train_and_evaluate(toy_config(toy), tmp_path, preemption=StopAt(12))
    assert first["status"] == "preempted"
    assert train_and_evaluate(toy_config(toy), tmp_path)["status"] == "done"
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(read_metrics(tmp_path)[24][key], reference[24][key], rtol=1e-5, err_msg=key)


def test_mae_initialisation_and_mismatched_checkpoints(toy, fixtures_dir, tmp_path):
    """The vit_tiny fixture (width 32, depth 2: the smoke size) initialises the blocks; positions are resized from
    4x4 to the 8x8 token grid; the 10-class head and `norm` are replaced by a fresh 4-class head and `fc_norm`."""
    path = fixtures_dir / "vit_tiny" / "vit.pth"
    task = ClassifierTask(toy_config(toy, **{"classifier.embedding": "learned",
                                             "classifier.init_checkpoint": str(path)}))
    backbone = task.init_state().params["backbone"]
    _, official = load_official("vit", path, num_heads=2, num_tokens=64, global_pool="avg", num_classes=4)
    np.testing.assert_array_equal(backbone["blocks_1"]["mlp"]["fc1"]["kernel"],
                                  official["params"]["blocks_1"]["mlp"]["fc1"]["kernel"])
    np.testing.assert_array_equal(backbone["pos_embed"], official["params"]["pos_embed"])
    assert backbone["head"]["kernel"].shape == (32, 4) and "norm" not in backbone

    with pytest.raises(FileNotFoundError, match="mae_pretrain_vit_base.pth not found"):
        ClassifierTask(toy_config(toy, **{"classifier.embedding": "learned",
                                          "classifier.init_checkpoint": str(tmp_path / "mae_pretrain_vit_base.pth")}))
    with pytest.raises(CheckpointMismatchError, match=r"vit.pth: a ViT of \(depth, width, mlp_ratio\) \(2, 32"):
        ClassifierTask(toy_config(toy, **{"classifier.embedding": "learned", "classifier.depth": 3,
                                          "classifier.init_checkpoint": str(path)}))
    with np.load(fixtures_dir / "vit_tiny" / "reference.npz") as data:
        state = {k.removeprefix("state_dict/"): data[k] for k in data.files if k.startswith("state_dict/")}
    del state["blocks.1.attn.proj.weight"]
    np.savez(tmp_path / "broken.npz", **state)
    with pytest.raises(CheckpointMismatchError, match="(?s)broken.npz.*missing.*blocks_1/attn/proj/kernel"):
        ClassifierTask(toy_config(toy, **{"classifier.embedding": "learned",
                                          "classifier.init_checkpoint": str(tmp_path / "broken.npz")}))


@pytest.mark.parametrize("overrides, error, message", [
    ({"data.eval_encoded_dir": ""}, ValueError, "config.data.eval_encoded_dir=''"),
    ({"classifier.num_codes": 999}, ValueError, "config.classifier.num_codes=999 does not match the 64 "),
    ({"classifier.width": 33}, ValueError, "num_heads 2 must be positive, heads dividing width"),
    ({"optimizer.layer_decay": 0.0}, ValueError, "config.optimizer.layer_decay=0.0"),
    ({"tokenizer_dir": "/nowhere"}, FileNotFoundError, "tokenizer '/nowhere' not found"),
])
def test_bad_inputs_are_named(toy, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message.replace(".", r"\.").replace("(", r"\(")):
        train_and_evaluate(toy_config(toy, **overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_held_out_split_of_another_tokenizer_is_refused(toy, tmp_path):
    swapped = toy_config(toy, **{"data.eval_encoded_dir": str(toy["train"]), "tokenizer_dir": str(toy["tokenizer"])})
    manifest = json.loads((toy["held_out"] / "manifest.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    for f in toy["held_out"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    manifest["tokenizer_digest"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    swapped.data.eval_encoded_dir = str(other)
    with pytest.raises(ValueError, match=f"held-out split {other} has tokenizer_digest 0000"):
        ClassifierTask(swapped)
