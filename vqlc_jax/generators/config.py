"""The generator trainer's config: defaults shared by every generator experiment, and the check run at start-up.

An experiment file (`configs/gpt_*.py`) starts from `base_config(family)` and overrides what it needs; the dict is
locked, so a mistyped key fails at once with the key named. Sizes the data decide (number of codes, classes, token
grid) are read off the encoded dataset; a config that states one (`model.num_codes`, `model.num_classes`) must
agree with it.
"""

from __future__ import annotations

import ml_collections

from vqlc_jax.generators import eval_config
from vqlc_jax.generators.family import FAMILIES
DTYPES = ("float32", "bfloat16")
IMAGENET_TRAIN_IMAGES = 1_281_167


def base_config(family: str = "gpt") -> ml_collections.ConfigDict:
    """The release's class-conditional GPT recipe (minGPT, 24 layers x 1024, batch 1024, lr 4.5e-4, AdamW (0.9,
    0.95), linear decay after warm-up, pkeep 0.8), with EMA of the weights for sampling."""
    c = ml_collections.ConfigDict()
    c.generator = family
    c.seed = 0
    c.global_batch_size = 1024
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.global_batch_size
    c.total_steps = 100 * steps_per_epoch
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2_000
    c.eval_every_steps = 10_000
    c.keep_checkpoints = 3

    # The encoded dataset (`python -m vqlc_jax.generators.encode`) and the tokenizer that decodes samples (default:
    # the one recorded in the dataset's manifest).
    c.data = ml_collections.ConfigDict(dict(encoded_dir="", use_flips=False))  # the release: centre crops only
    c.tokenizer_dir = ""

    c.model = ml_collections.ConfigDict(dict(
        variant="mingpt", num_layers=24, num_heads=16, width=1024, null_class=False, dtype="float32", remat=False,
        num_codes=0, num_classes=0))  # 0: read off the dataset
    c.loss = ml_collections.ConfigDict(dict(
        pkeep=0.8,  # the release's input corruption: each input image token replaced w.p. 1 - pkeep
        class_dropout=0.0,  # labels replaced by the null class w.p. this (needs model.null_class): CFG training
        label_smoothing=0.0, chunk_size=16_384))
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=4.5e-4, warmup_steps=5 * steps_per_epoch, decay="linear", min_lr=0.0, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.01, grad_clip=1.0))
    c.ema = ml_collections.ConfigDict(dict(decay=0.9999))
    # Sampling: during training (a PNG grid) and in the evaluation job. top_k = 0: 10% of the codes (the paper).
    c.sample = ml_collections.ConfigDict(dict(
        temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0, grid_classes=8, grid_per_class=8, use_ema=True))
    # Generation evaluation during training (the full job: `python -m vqlc_jax.generators.evaluate`).
    # FID needs `inception_path` (pytorch-fid's weights) and a reference: `reference_path` (an ADM .npz or saved
    # statistics) or the real split `reference_data` (see vqlc_jax/generators/eval_config.py).
    c.eval = eval_config.metrics_config()
    c.eval.update(num_samples=1_000, batch_size=250)
    c.mesh = ml_collections.ConfigDict(dict(model_axis=1))
    return c


def apply_variant(c: ml_collections.ConfigDict, arg: str | None, file: str) -> ml_collections.ConfigDict:
    """The variants every GPT experiment file offers: `:cfg` adds the null class, 10% label dropout and guidance
    2.0 at sampling (the release has no guidance)."""
    if arg == "cfg":
        c.model.null_class = True
        c.loss.class_dropout = 0.1
        c.sample.cfg_scale = 2.0
    elif arg:
        raise ValueError(f"{file}: unknown variant {arg!r} (choices: cfg)")
    return c


def _require(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        raise ValueError(f"config.{key}={value!r}: {why}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first key whose value cannot work (dataset-dependent checks come later)."""
    _require(c.generator in FAMILIES, "generator", c.generator, f"choices: {', '.join(sorted(FAMILIES))}")
    for key in ("global_batch_size", "total_steps", "log_every_steps", "checkpoint_every_steps", "eval_every_steps",
                "keep_checkpoints"):
        _require(isinstance(c[key], int) and c[key] > 0, key, c[key], "must be a positive integer")
    _require(bool(c.data.encoded_dir), "data.encoded_dir", c.data.encoded_dir,
             "set it to a folder written by `python -m vqlc_jax.generators.encode`")
    m = c.model
    _require(m.variant in ("mingpt", "llamagen"), "model.variant", m.variant, "choices: mingpt, llamagen")
    _require(m.dtype in DTYPES, "model.dtype", m.dtype, f"choices: {', '.join(DTYPES)}")
    for key in ("num_layers", "num_heads", "width"):
        _require(m[key] > 0, f"model.{key}", m[key], "must be positive")
    _require(m.width % m.num_heads == 0, "model.width", m.width, f"must be divisible by num_heads={m.num_heads}")
    _require(0 < c.loss.pkeep <= 1, "loss.pkeep", c.loss.pkeep, "must lie in (0, 1]")
    _require(0 <= c.loss.class_dropout < 1, "loss.class_dropout", c.loss.class_dropout, "must lie in [0, 1)")
    _require(c.loss.class_dropout == 0 or m.null_class, "loss.class_dropout", c.loss.class_dropout,
             "dropped labels become the null class: set model.null_class=True")
    _require(0 <= c.loss.label_smoothing < 1, "loss.label_smoothing", c.loss.label_smoothing, "must lie in [0, 1)")
    _require(c.loss.chunk_size > 0, "loss.chunk_size", c.loss.chunk_size, "must be positive")
    o = c.optimizer
    _require(o.lr > 0, "optimizer.lr", o.lr, "must be positive")
    _require(0 <= o.warmup_steps <= c.total_steps, "optimizer.warmup_steps", o.warmup_steps,
             f"must lie in [0, total_steps={c.total_steps}]")
    _require(o.decay in ("cosine", "linear", "constant"), "optimizer.decay", o.decay,
             "choices: cosine, linear, constant")
    _require(o.grad_clip >= 0, "optimizer.grad_clip", o.grad_clip, "must be >= 0 (0: no clipping)")
    _require(0 <= c.ema.decay < 1, "ema.decay", c.ema.decay, "must lie in [0, 1)")
    s = c.sample
    _require(s.temperature > 0, "sample.temperature", s.temperature, "must be positive")
    _require(s.top_k >= 0, "sample.top_k", s.top_k, "must be >= 0 (0: 10% of the codes)")
    _require(0 < s.top_p <= 1, "sample.top_p", s.top_p, "must lie in (0, 1]")
    _require(s.cfg_scale == 1.0 or m.null_class, "sample.cfg_scale", s.cfg_scale,
             "guidance needs the null class: set model.null_class=True (and train with loss.class_dropout > 0)")
    _require(c.eval.resize in ("clean", "legacy"), "eval.resize", c.eval.resize, "choices: clean, legacy")
