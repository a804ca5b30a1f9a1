"""Classify images from their token maps (the VQGAN-LC paper's Figure 1b): `train_and_evaluate(config, workdir)`.

The classifier's `Task` for the shared loop (`train.loop`): a ViT over the encoded dataset's token maps
(`models.token_classifier`; the token embedding a learned table or a linear map of the tokenizer's frozen codebook
rows), optionally initialised from MAE's pretrained ViT (`classifier.init_checkpoint`, MAE/timm layout: the blocks,
CLS token and positions resized to the token grid; the patch embedding is replaced, `fc_norm` and the head start
fresh), trained with MAE's fine-tuning recipe: AdamW, layer-wise lr decay (`layer_decay_scales`), warm-up then
cosine, label smoothing, drop path; weight decay on matrices except the CLS token and positions.

Applied to tokens: horizontal flips (the encoded mirror images, `data.use_flips`). Not applied: MAE's mixup, cutmix,
RandAugment and random erasing, which act on pixels (the token maps are encoded once, from centre crops).

Top-1 / top-5 (and the loss) on the held-out encoded split `data.eval_encoded_dir` at every evaluation go to
TensorBoard and `metrics.jsonl` (keys `eval/...`), and to `eval.json` / `eval.md` (the latest evaluation).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vqlc_jax import parallel
from vqlc_jax.train import loop
from vqlc_jax.train.config import _require

Array = jax.Array
PyTree = Any
IMAGENET_TRAIN_IMAGES = 1_281_167
DTYPES = ("float32", "bfloat16")
# Parameters that MAE (timm's `no_weight_decay`) exempts from weight decay besides every vector.
NO_WEIGHT_DECAY = ("cls_token", "pos_embed")


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------
def base_config() -> ml_collections.ConfigDict:
    """MAE's ViT-B fine-tuning recipe on ImageNet token maps: batch 1024, 100 epochs (5 of warm-up), lr 2e-3
    (MAE's base lr 5e-4 x 1024 / 256) down to 1e-6 by a cosine, AdamW (0.9, 0.999) with weight decay 0.05,
    layer decay 0.65, label smoothing 0.1, drop path 0.1, average pooling with `fc_norm`."""
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // 1024
    c = loop.add_loop_keys(ml_collections.ConfigDict(), global_batch_size=1024, total_steps=100 * steps_per_epoch,
                           checkpoint_every_steps=5 * steps_per_epoch, eval_every_steps=10 * steps_per_epoch)
    # The encoded train split and the held-out split (`python -m vqlc_jax.generators.encode`, same tokenizer).
    c.data = ml_collections.ConfigDict(dict(encoded_dir="", eval_encoded_dir="", use_flips=True))
    # The tokenizer whose frozen codebook the "codebook" embedding reads (default: the one in the dataset manifest).
    c.tokenizer_dir = ""
    # size: a key of models.vit.VIT_SIZES (depth, width, num_heads 0: the size's); num_codes / num_classes 0: read
    # off the dataset (else must agree).
    c.classifier = ml_collections.ConfigDict(dict(
        size="B", depth=0, width=0, num_heads=0, embedding="codebook", global_pool="avg", drop_path_rate=0.1,
        dtype="float32", init_checkpoint="", num_codes=0, num_classes=0))
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=2e-3, warmup_steps=5 * steps_per_epoch, min_lr=1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
        layer_decay=0.65, grad_clip=0.0))
    c.loss = ml_collections.ConfigDict(dict(label_smoothing=0.1))
    c.eval = ml_collections.ConfigDict(dict(batch_size=1024))
    c.mesh = ml_collections.ConfigDict(dict(model_axis=1))
    return c


def imagenet_config(num_codes: int, embedding: str, arg: str | None, file: str) -> ml_collections.ConfigDict:
    """The ImageNet experiment of a tokenizer with `num_codes` codes: `base_config` with MAE's ViT-B checkpoint
    (`mae_pretrain_vit_base.pth`, a path the user may override) and `embedding`; variant `:learned` uses a
    learned table whatever the default."""
    c = base_config()
    c.classifier.update(num_codes=num_codes, embedding=embedding, init_checkpoint="mae_pretrain_vit_base.pth")
    if arg == "learned":
        c.classifier.embedding = "learned"
    elif arg:
        raise ValueError(f"{file}: unknown variant {arg!r} (choices: learned)")
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first key whose value cannot work (dataset-dependent checks come later)."""
    from vqlc_jax.models.token_classifier import EMBEDDINGS
    from vqlc_jax.models.vit import GLOBAL_POOLS, VIT_SIZES

    loop.validate_loop_keys(c)
    for key in ("encoded_dir", "eval_encoded_dir"):
        _require(bool(c.data[key]), f"data.{key}", c.data[key],
                 "set it to a folder written by `python -m vqlc_jax.generators.encode`")
    m, o = c.classifier, c.optimizer
    _require(m.size in VIT_SIZES, "classifier.size", m.size, f"choices: {', '.join(VIT_SIZES)}")
    depth, width, heads = vit_dims(m)
    _require(depth > 0 and width > 0 and heads > 0 and width % heads == 0, "classifier.width", width,
             f"depth {depth}, width {width} and num_heads {heads} must be positive, heads dividing width")
    _require(m.embedding in EMBEDDINGS, "classifier.embedding", m.embedding, f"choices: {', '.join(EMBEDDINGS)}")
    _require(m.global_pool in GLOBAL_POOLS, "classifier.global_pool", m.global_pool,
             f"choices: {', '.join(GLOBAL_POOLS)}")
    _require(0 <= m.drop_path_rate < 1, "classifier.drop_path_rate", m.drop_path_rate, "must lie in [0, 1)")
    _require(m.dtype in DTYPES, "classifier.dtype", m.dtype, f"choices: {', '.join(DTYPES)}")
    _require(o.lr > 0, "optimizer.lr", o.lr, "must be positive")
    _require(0 <= o.warmup_steps <= c.total_steps, "optimizer.warmup_steps", o.warmup_steps,
             f"must lie in [0, total_steps={c.total_steps}]")
    _require(0 < o.layer_decay <= 1, "optimizer.layer_decay", o.layer_decay, "must lie in (0, 1] (1: no decay)")
    _require(o.grad_clip >= 0, "optimizer.grad_clip", o.grad_clip, "must be >= 0 (0: no clipping)")
    _require(0 <= c.loss.label_smoothing < 1, "loss.label_smoothing", c.loss.label_smoothing, "must lie in [0, 1)")
    _require(c.eval.batch_size > 0, "eval.batch_size", c.eval.batch_size, "must be positive")


# ----------------------------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay and the optimiser
# ----------------------------------------------------------------------------------------------------------------------
def layer_id(path: tuple[str, ...], depth: int) -> int:
    """MAE's `get_layer_id_for_vit` on a parameter path: the token embedding, CLS token and positions are layer 0,
    `blocks_i` is layer i + 1, everything else (`norm`, `fc_norm`, `head`) layer depth + 1."""
    for name in path:
        if name.startswith("blocks_"):
            return int(name.removeprefix("blocks_")) + 1
        if name in ("token_embed", *NO_WEIGHT_DECAY):
            return 0
    return depth + 1


def layer_decay_scales(params: PyTree, depth: int, decay: float) -> PyTree:
    """The learning-rate scale of each parameter, `decay ** (depth + 1 - layer_id)` (MAE's `param_groups_lrd`): 1
    for the head, `decay ** 13` for the embeddings of a 12-block ViT."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decay ** (depth + 1 - layer_id(tuple(k.key for k in path), depth)), params)


def weight_decay_mask(params: PyTree) -> PyTree:
    """True where MAE applies weight decay: matrices, except the CLS token and the positions."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and path[-1].key not in NO_WEIGHT_DECAY, params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int, scales: PyTree) -> optax.GradientTransformation:
    """AdamW on the warm-up + cosine schedule (weight decay as `weight_decay_mask`), each update scaled by its
    layer's `scales` (lr and weight decay alike, as torch's per-group lr); global-norm clipping first if
    `grad_clip` > 0."""
    schedule = loop.lr_schedule(opt.lr, warmup_steps=opt.warmup_steps, total_steps=total_steps, min_lr=opt.min_lr)
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                        mask=weight_decay_mask)
    scaled = optax.chain(adamw, optax.stateless(lambda updates, params: jax.tree.map(jnp.multiply, updates, scales)))
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), scaled) if opt.grad_clip > 0 else scaled


# ----------------------------------------------------------------------------------------------------------------------
# Model, weights, steps
# ----------------------------------------------------------------------------------------------------------------------
def vit_dims(m: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(depth, width, num_heads) of `config.classifier`: its size's, each overridden where set (> 0)."""
    from vqlc_jax.models.vit import VIT_SIZES

    return tuple(own or size for own, size in zip((m.depth, m.width, m.num_heads), VIT_SIZES[m.size]))


def build_model(c: ml_collections.ConfigDict, *, num_codes: int, num_tokens: int, num_classes: int,
                codebook_dim: int = 0):
    """The `TokenClassifier` the config describes for a dataset of these sizes."""
    from vqlc_jax.models.token_classifier import TokenClassifier
    from vqlc_jax.models.vit import ViT

    m = c.classifier
    depth, width, heads = vit_dims(m)
    backbone = ViT(num_tokens=num_tokens, width=width, depth=depth, num_heads=heads, num_classes=num_classes,
                   global_pool=m.global_pool, drop_path_rate=m.drop_path_rate, dtype=jnp.dtype(m.dtype))
    return TokenClassifier(num_codes, m.embedding, backbone, codebook_dim)


def load_mae_backbone(path: str, backbone, seed: int) -> PyTree:
    """The params of `backbone` (a `ViT`) read from MAE's / timm's checkpoint `path` (see `convert.mae_weights`;
    `seed` initialises what it lacks); raises naming the file when it is missing or holds another ViT size."""
    from vqlc_jax.convert.mae_weights import load_official_vit
    from vqlc_jax.convert.torch_layout import CheckpointMismatchError

    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"config.classifier.init_checkpoint: {path} not found (MAE's ViT checkpoint, e.g. "
                                "mae_pretrain_vit_base.pth; set '' to start from random weights)")
    model, variables = load_official_vit(path, num_heads=backbone.num_heads, num_classes=backbone.num_classes,
                                         global_pool=backbone.global_pool, num_tokens=backbone.num_tokens, seed=seed)
    got = (model.depth, model.width, model.mlp_ratio)
    want = (backbone.depth, backbone.width, backbone.mlp_ratio)
    if got != want:
        raise CheckpointMismatchError(f"{path}: a ViT of (depth, width, mlp_ratio) {got}, the config's "
                                      f"classifier.size wants {want}")
    return jax.tree.map(jnp.asarray, variables["params"])


@flax.struct.dataclass
class ClassifierState:
    """Everything a classifier run carries from step to step (and checkpoints). The data position is `step`."""

    step: Array
    params: PyTree
    opt_state: PyTree
    rng: Array


def train_step(model, optimizer: optax.GradientTransformation, label_smoothing: float, state: ClassifierState,
               batch: dict[str, Array], frozen: dict) -> tuple[ClassifierState, dict[str, Array]]:
    """One optimisation step on a (sharded) batch: label-smoothed cross-entropy, drop path from the `dropout` rng;
    `frozen` holds the non-trainable collections (the codebook)."""
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        logits = model.apply({"params": params, **frozen}, batch["tokens"], train=True, rngs={"dropout": rng})
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]), label_smoothing)
        return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "train_top1": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), metrics


def eval_sums(model, params: PyTree, frozen: dict, batch: dict[str, Array], top_k: int) -> dict[str, Array]:
    """Sums over the real (mask) rows of a batch: examples, top-1 and top-`top_k` hits, cross-entropy."""
    logits = model.apply({"params": params, **frozen}, batch["tokens"]).astype(jnp.float32)
    label, mask = batch["label"], batch["mask"]
    ranks = jnp.sum(logits > jnp.take_along_axis(logits, label[:, None], axis=-1), axis=-1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, label)
    return {"count": mask.sum(), "top1": jnp.sum(mask & (ranks < 1)), "top5": jnp.sum(mask & (ranks < top_k)),
            "loss": jnp.sum(jnp.where(mask, ce, 0.0))}


# ----------------------------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------------------------
def open_datasets(c: ml_collections.ConfigDict):
    """(train, held-out) encoded datasets; raises naming both folders unless one tokenizer wrote both with the
    same token grid and classes, and when a size the config states differs from the data's."""
    from vqlc_jax.data.encoded import open_encoded

    train, held_out = open_encoded(c.data.encoded_dir), open_encoded(c.data.eval_encoded_dir)
    for what, get in (("tokenizer_digest", lambda d: d.manifest["tokenizer_digest"]),
                      ("token_shape", lambda d: d.token_shape), ("num_classes", lambda d: d.num_classes)):
        if get(train) != get(held_out):
            raise ValueError(f"the held-out split {held_out.directory} has {what} {get(held_out)}, the train split "
                             f"{train.directory} {get(train)}: encode both with the same tokenizer and dataset")
    for key, value in (("num_codes", train.num_codes), ("num_classes", train.num_classes)):
        stated = c.classifier[key]
        if stated and stated != value:
            raise ValueError(f"config.classifier.{key}={stated} does not match the {value} of the encoded dataset "
                             f"{train.directory} (set 0 to read it off the dataset)")
    return train, held_out


def frozen_codebook(dataset, tokenizer_dir: str) -> np.ndarray:
    """float32 [num_codes, codebook_dim]: the frozen `lc` codebook of the tokenizer that encoded `dataset` (checked
    by the digest of its weights), standardised per feature over the codes (fixed statistics)."""
    from vqlc_jax.generators.encode import variables_digest
    from vqlc_jax.tokenizer import LC_CODEBOOK_PATH, Tokenizer

    directory = tokenizer_dir or dataset.tokenizer_dir
    if not directory or not pathlib.Path(directory).is_dir():
        raise FileNotFoundError(f"the codebook embedding reads the tokenizer's frozen codebook: tokenizer "
                                f"{directory!r} not found (set config.tokenizer_dir)")
    tokenizer = Tokenizer.load(directory)
    if tokenizer.config.quantizer.name != "lc":
        raise ValueError(f"tokenizer {directory} has a {tokenizer.config.quantizer.name!r} quantizer: only `lc` has a "
                         "frozen codebook; use config.classifier.embedding='learned'")
    if variables_digest(tokenizer.variables) != dataset.manifest["tokenizer_digest"]:
        raise ValueError(f"tokenizer {directory} is not the one that encoded {dataset.directory} (weights digest "
                         "differs)")
    collection, module, name = LC_CODEBOOK_PATH
    rows = np.asarray(tokenizer.variables[collection][module][name], np.float64)
    return ((rows - rows.mean(0)) / (rows.std(0) + 1e-6)).astype(np.float32)


class ClassifierTask(loop.Task):
    """The token-map classifier on the shared loop."""

    def __init__(self, config: ml_collections.ConfigDict):
        validate(config)
        self.config = c = config
        self.dataset, self.held_out = open_datasets(c)
        h, w = self.dataset.token_shape
        self.num_classes = self.dataset.num_classes
        self.mesh = parallel.make_mesh(c.mesh.model_axis)
        parallel.check_batch_size(c.global_batch_size, self.mesh)
        parallel.check_batch_size(c.eval.batch_size, self.mesh)
        replicated = parallel.replicated(self.mesh)
        codebook = frozen_codebook(self.dataset, c.tokenizer_dir) if c.classifier.embedding == "codebook" else None
        self.frozen = {} if codebook is None else {"codebook": {"embedding": jax.device_put(codebook, replicated)}}
        self.model = build_model(c, num_codes=self.dataset.num_codes, num_tokens=h * w, num_classes=self.num_classes,
                                 codebook_dim=0 if codebook is None else codebook.shape[1])
        self.schedule = loop.lr_schedule(c.optimizer.lr, warmup_steps=c.optimizer.warmup_steps,
                                         total_steps=c.total_steps, min_lr=c.optimizer.min_lr)
        tokens = jnp.zeros((1, h, w), jnp.int32)
        abstract = jax.eval_shape(lambda: self.model.init(jax.random.key(0), tokens)["params"])
        scales = layer_decay_scales(abstract, self.model.backbone.depth, c.optimizer.layer_decay)
        self.optimizer = make_optimizer(c.optimizer, c.total_steps, scales)
        backbone = (load_mae_backbone(c.classifier.init_checkpoint, self.model.backbone, c.seed)
                    if c.classifier.init_checkpoint else None)
        self.rows = parallel.batch_sharding(self.mesh)

        def init(backbone) -> ClassifierState:
            k_params, k_state = jax.random.split(jax.random.key(c.seed))
            params = self.model.init(k_params, tokens)["params"]
            if backbone is not None:
                params = {**params, "backbone": backbone}
            return ClassifierState(step=jnp.zeros((), jnp.int32), params=params,
                                   opt_state=self.optimizer.init(params), rng=k_state)

        self.state_shardings = parallel.tree_shardings(self.mesh, jax.eval_shape(init, backbone))
        self._init = lambda: jax.jit(init, out_shardings=self.state_shardings)(backbone)
        frozen_shardings = jax.tree.map(lambda _: replicated, self.frozen)
        self._step = jax.jit(lambda s, b, f: train_step(self.model, self.optimizer, c.loss.label_smoothing, s, b, f),
                             in_shardings=(self.state_shardings, self.rows, frozen_shardings),
                             out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
        top_k = min(5, self.num_classes)
        self._eval = jax.jit(lambda p, f, b: eval_sums(self.model, p, f, b, top_k),
                             in_shardings=(self.state_shardings.params, frozen_shardings, self.rows),
                             out_shardings=replicated)

    # ---- The loop's hooks. -------------------------------------------------------------------------------------------
    def init_state(self) -> ClassifierState:
        return self._init()

    def batches(self, start_step: int):
        c = self.config
        return iter(self._pipeline(self.dataset, c.global_batch_size, train=True, start_step=start_step,
                                   use_flips=c.data.use_flips))

    def step(self, state: ClassifierState, batch, step: int):
        arrays = {"tokens": parallel.global_batch(batch.tokens, self.rows),
                  "label": parallel.global_batch(batch.label, self.rows)}
        return self._step(state, arrays, self.frozen)

    def learning_rate(self, step: int) -> float:
        """The head's (layer-decay scale 1)."""
        return float(self.schedule(step - 1))

    def evaluate(self, state: ClassifierState, workdir: pathlib.Path, step: int, writer) -> dict[str, float]:
        """Top-1, top-5 and loss over the whole held-out split; written to TensorBoard, `metrics.jsonl`,
        `eval.json` and `eval.md`."""
        totals = {}
        for batch in self._pipeline(self.held_out, self.config.eval.batch_size, train=False, use_flips=False):
            arrays = {name: parallel.global_batch(getattr(batch, name), self.rows)
                      for name in ("tokens", "label", "mask")}
            sums = jax.device_get(self._eval(state.params, self.frozen, arrays))
            totals = {k: totals.get(k, 0) + float(v) for k, v in sums.items()}
        count = totals.pop("count")
        scalars = {f"eval/{k}": v / count for k, v in totals.items()}
        writer.write_scalars(step, scalars)
        if jax.process_index() == 0:
            log = loop.MetricsLog(workdir)
            log.write({"step": step, **scalars})
            log.close()
            self._write_report(workdir, step, int(count), scalars)
        return scalars

    def _pipeline(self, dataset, global_batch_size: int, **options):
        """This process's batches of tokens and labels of an encoded `dataset`."""
        from vqlc_jax.data.encoded import make_encoded_pipeline

        return make_encoded_pipeline(dataset, global_batch_size=global_batch_size, seed=self.config.seed,
                                     process_index=jax.process_index(), process_count=jax.process_count(), **options)

    def _write_report(self, workdir: pathlib.Path, step: int, count: int, scalars: dict[str, float]) -> None:
        c = self.config
        report = {"step": step, "num_images": count, "top1": scalars["eval/top1"], "top5": scalars["eval/top5"],
                  "loss": scalars["eval/loss"], "top_k": min(5, self.num_classes), "num_classes": self.num_classes,
                  "encoded_dir": str(self.dataset.directory), "eval_encoded_dir": str(self.held_out.directory),
                  "vit": "depth {}, width {}, heads {}".format(*vit_dims(c.classifier)),
                  "embedding": c.classifier.embedding,
                  "init_checkpoint": c.classifier.init_checkpoint}
        (workdir / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
        (workdir / "eval.md").write_text(
            f"# Classification on token maps (step {step})\n\n"
            f"ViT ({report['vit']}), `{report['embedding']}` token embedding, init: "
            f"{report['init_checkpoint'] or 'random'}; held-out: {report['eval_encoded_dir']}\n\n"
            "| images | classes | top-1 (%) | top-5 (%) | loss |\n|---|---|---|---|---|\n"
            f"| {count} | {self.num_classes} | {100 * report['top1']:.2f} | {100 * report['top5']:.2f} | "
            f"{report['loss']:.4f} |\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       preemption: Any = None) -> dict[str, Any]:
    """Trains the classifier (resuming from `workdir` when it holds checkpoints) and evaluates it on the held-out
    split; see `train.loop.run` for `preemption` and the result."""
    return loop.run(ClassifierTask(config), workdir, preemption=preemption)
