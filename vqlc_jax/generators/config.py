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
from vqlc_jax.train import loop
DTYPES = ("float32", "bfloat16")
IMAGENET_TRAIN_IMAGES = 1_281_167


def base_config(family: str = "gpt") -> ml_collections.ConfigDict:
    """The release's recipe of `family`. gpt: minGPT 24 x 1024, batch 1024, lr 4.5e-4, AdamW (0.9, 0.95), linear
    decay after 5 warm-up epochs, pkeep 0.8, 100 epochs. dit / sit: XL/2, batch 256, AdamW lr 1e-4 constant without
    weight decay, 400K steps, EMA 0.9999, guidance 8 on every latent channel; dit samples 250 ancestral steps, sit
    the dopri5 ODE. ldm: the f16 UNet, LDM's DDPM, DDIM 200 steps with eta 1 and guidance 1.6 (its optimiser
    settings are this file's DiT ones, not the release's). All keep an EMA of the weights for sampling."""
    if family not in FAMILY_SECTIONS:
        raise ValueError(f"generator family {family!r}: choices: {', '.join(FAMILY_SECTIONS)}")
    c = loop.add_loop_keys(ml_collections.ConfigDict(), global_batch_size=1024, total_steps=0)
    c.generator = family

    # The encoded dataset (`python -m vqlc_jax.generators.encode`) and the tokenizer that decodes samples (default:
    # the one recorded in the dataset's manifest).
    c.data = ml_collections.ConfigDict(dict(encoded_dir="", use_flips=False))  # the releases: centre crops only
    c.tokenizer_dir = ""
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=4.5e-4, warmup_steps=0, decay="linear", min_lr=0.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01,
        grad_clip=1.0))
    c.ema = ml_collections.ConfigDict(dict(decay=0.9999))
    # Generation evaluation during training (the full job: `python -m vqlc_jax.generators.evaluate`).
    # FID needs `inception_path` (pytorch-fid's weights) and a reference: `reference_path` (an ADM .npz or saved
    # statistics) or the real split `reference_data` (see vqlc_jax/generators/eval_config.py).
    c.eval = eval_config.metrics_config()
    c.eval.update(num_samples=1_000, batch_size=250)
    c.mesh = ml_collections.ConfigDict(dict(model_axis=1))
    FAMILY_SECTIONS[family](c)
    return c


def _gpt_sections(c: ml_collections.ConfigDict) -> None:
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.global_batch_size
    c.total_steps = 100 * steps_per_epoch
    c.optimizer.warmup_steps = 5 * steps_per_epoch
    c.model = ml_collections.ConfigDict(dict(
        variant="mingpt", num_layers=24, num_heads=16, width=1024, null_class=False, dtype="float32", remat=False,
        num_codes=0, num_classes=0))  # 0: read off the dataset
    c.loss = ml_collections.ConfigDict(dict(
        pkeep=0.8,  # the release's input corruption: each input image token replaced w.p. 1 - pkeep
        class_dropout=0.0,  # labels replaced by the null class w.p. this (needs model.null_class): CFG training
        label_smoothing=0.0, chunk_size=16_384))
    # Sampling: during training (a PNG grid) and in the evaluation job. top_k = 0: 10% of the codes (the paper).
    c.sample = ml_collections.ConfigDict(dict(
        temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0, grid_classes=8, grid_per_class=8, use_ema=True))


def _far_sections(c: ml_collections.ConfigDict) -> None:
    """FQGAN's FAR-B recipe (`train_far_dual.sh`): batch 256, 300 epochs, AdamW lr 1e-4 constant, (0.9, 0.95),
    weight decay 0.05, clipping 1.0, dropout 0.1 (tokens, residuals, FFN), labels dropped 10% of the time; sampling
    with guidance 2.0 on every sub-token, top-k off, top-p 1, temperature 1 (`eval_far.sh`). The release trains
    without EMA by default; here the EMA weights sample (`sample.use_ema = False` samples the raw ones)."""
    c.global_batch_size = 256
    c.total_steps = 300 * (IMAGENET_TRAIN_IMAGES // c.global_batch_size)
    c.optimizer.update(lr=1e-4, decay="constant", weight_decay=0.05)
    c.data.use_flips = True  # the release trains on flipped (and ten-crop) codes
    c.model = ml_collections.ConfigDict(dict(
        num_layers=24, num_heads=16, width=1024, head_layers=3, dropout=0.1, zero_head=True, dtype="float32",
        remat=False,
        # 0 / (): read off the encoded dataset (token maps [k, h, w]); stated values must match it.
        num_codebooks=0, codebook_sizes=(), num_classes=0))
    c.loss = ml_collections.ConfigDict(dict(class_dropout=0.1, label_smoothing=0.0, chunk_size=16_384))
    # top_k = 0: off (the release); cfg_schedule "constant" or "linear" (1 at the first position, cfg_scale at the
    # last).
    c.sample = ml_collections.ConfigDict(dict(
        temperature=1.0, top_k=0, top_p=1.0, cfg_scale=2.0, cfg_schedule="constant", grid_classes=8,
        grid_per_class=8, use_ema=True))


def _dit_sections(c: ml_collections.ConfigDict) -> None:
    c.global_batch_size = 256
    c.total_steps = 400_000
    c.optimizer.update(lr=1e-4, decay="constant", b2=0.999, weight_decay=0.0, grad_clip=0.0)
    c.model = ml_collections.ConfigDict(dict(size="XL", patch_size=2, learn_sigma=True, dtype="float32",
                                             remat=False, num_classes=0,
                                             depth=0, hidden_size=0, num_heads=0))  # 0: the size's
    c.diffusion = ml_collections.ConfigDict(dict(num_steps=1000))
    c.loss = ml_collections.ConfigDict(dict(class_dropout=0.1, latent_scale="channel"))
    # sampler: "ddpm" (ancestral, DiT's) or "ddim" (eta); cfg_channels 0: every latent channel, 3: the release.
    c.sample = ml_collections.ConfigDict(dict(
        sampler="ddpm", steps=250, eta=0.0, cfg_scale=8.0, cfg_channels=0, cfg_interval=(0.0, 1.0), quantize=True,
        grid_classes=8,
        grid_per_class=8, use_ema=True))


def _sit_sections(c: ml_collections.ConfigDict) -> None:
    _dit_sections(c)
    c.model.learn_sigma = False  # SiT drops the sigma half
    c.transport = ml_collections.ConfigDict(dict(path="Linear", prediction="velocity", loss_weight=""))
    # sampler "ode" (ode_method dopri5 with SiT's tolerances; steps = output times, or euler / heun2 steps) or "sde"
    # (Euler-Maruyama, SiT's diffusion form and last step).
    c.sample = ml_collections.ConfigDict(dict(
        sampler="ode", ode_method="dopri5", steps=50, atol=1e-6, rtol=1e-3, diffusion_form="sigma",
        last_step="Mean", cfg_scale=8.0, cfg_channels=0, cfg_interval=(0.0, 1.0), quantize=True, grid_classes=8,
        grid_per_class=8, use_ema=True))


def _ldm_sections(c: ml_collections.ConfigDict) -> None:
    _dit_sections(c)
    del c.model["size"], c.model["patch_size"], c.model["learn_sigma"]
    del c.model["depth"], c.model["hidden_size"], c.model["num_heads"]
    c.model.update(preset="f16", model_channels=0)  # 0: the preset's width
    c.sample = ml_collections.ConfigDict(dict(
        sampler="ddim", steps=200, eta=1.0, cfg_scale=1.6, cfg_channels=0, cfg_interval=(0.0, 1.0), quantize=True,
        grid_classes=8,
        grid_per_class=8, use_ema=True))


FAMILY_SECTIONS = {"gpt": _gpt_sections, "far": _far_sections, "dit": _dit_sections, "sit": _sit_sections,
                   "ldm": _ldm_sections}


def latent_demo_config(family: str, arg: str | None, file: str) -> ml_collections.ConfigDict:
    """The CPU demo of a latent family (configs/{dit,sit,ldm}_demo.py) on the demo tokenizer's 8x8 latents of the
    bundled photos: a 4 x 192 transformer (DiT, SiT) or a 32-wide f16 UNet (LDM), 1,000 steps at batch 32, 10%
    label dropout, guidance 2; variant `smoke` runs a few steps of a smaller model (the tests)."""
    c = base_config(family)
    c.global_batch_size = 32
    c.total_steps = 1_000
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    c.eval_every_steps = 500
    c.data.use_flips = True
    if family == "ldm":
        c.model.model_channels = 32
    else:
        c.model.update(size="S", depth=4, hidden_size=192, num_heads=6)
    c.optimizer.update(lr=3e-4, warmup_steps=50, decay="cosine")
    c.ema.decay = 0.99
    c.sample.update(steps={"dit": 50, "sit": 16, "ldm": 50}[family], cfg_scale=2.0)
    c.eval.num_samples = 256
    if arg == "smoke":  # seconds on a CPU
        c.global_batch_size = 8
        c.total_steps = 4
        c.log_every_steps = 2
        c.checkpoint_every_steps = 2
        c.eval_every_steps = 4
        c.optimizer.warmup_steps = 1
        if family != "ldm":
            c.model.update(depth=2, hidden_size=64, num_heads=2)
        c.sample.update(steps=4, grid_classes=2, grid_per_class=2)
        if family == "sit":
            c.sample.ode_method = "heun2"
        c.eval.num_samples = 8
    elif arg:
        raise ValueError(f"{file}: unknown variant {arg!r} (choices: smoke)")
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


def far_imagenet_config(size: str, arg: str | None, file: str) -> ml_collections.ConfigDict:
    """FAR-B (24 layers x 1024, 16 heads, head 3 layers) or FAR-L (36 x 1280, 20 heads, head 4 layers) on FQGAN-Dual
    ImageNet token maps (16,384 visual + 16,384 semantic codes, 1,000 classes); variant `:triple` on FQGAN-Triple's
    three sub-codebooks of 16,384."""
    c = base_config("far")
    if size == "L":
        c.model.update(num_layers=36, num_heads=20, width=1280, head_layers=4)
    k = {None: 2, "triple": 3}.get(arg)
    if k is None:
        raise ValueError(f"{file}: unknown variant {arg!r} (choices: triple)")
    c.model.update(num_codebooks=k, codebook_sizes=(16_384,) * k, num_classes=1_000, remat=True)
    return c


def _require(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        raise ValueError(f"config.{key}={value!r}: {why}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first key whose value cannot work (dataset-dependent checks come later)."""
    _require(c.generator in FAMILIES, "generator", c.generator, f"choices: {', '.join(sorted(FAMILIES))}")
    loop.validate_loop_keys(c)
    _require(bool(c.data.encoded_dir), "data.encoded_dir", c.data.encoded_dir,
             "set it to a folder written by `python -m vqlc_jax.generators.encode`")
    o = c.optimizer
    _require(o.lr > 0, "optimizer.lr", o.lr, "must be positive")
    _require(0 <= o.warmup_steps <= c.total_steps, "optimizer.warmup_steps", o.warmup_steps,
             f"must lie in [0, total_steps={c.total_steps}]")
    _require(o.decay in ("cosine", "linear", "constant"), "optimizer.decay", o.decay,
             "choices: cosine, linear, constant")
    _require(o.grad_clip >= 0, "optimizer.grad_clip", o.grad_clip, "must be >= 0 (0: no clipping)")
    _require(0 <= c.ema.decay < 1, "ema.decay", c.ema.decay, "must lie in [0, 1)")
    _require(c.model.dtype in DTYPES, "model.dtype", c.model.dtype, f"choices: {', '.join(DTYPES)}")
    {"gpt": _validate_gpt, "far": _validate_far}.get(c.generator, _validate_latent)(c)
    _require(c.eval.resize in ("clean", "legacy"), "eval.resize", c.eval.resize, "choices: clean, legacy")


def _validate_gpt(c: ml_collections.ConfigDict) -> None:
    m, s = c.model, c.sample
    _require(m.variant in ("mingpt", "llamagen"), "model.variant", m.variant, "choices: mingpt, llamagen")
    for key in ("num_layers", "num_heads", "width"):
        _require(m[key] > 0, f"model.{key}", m[key], "must be positive")
    _require(m.width % m.num_heads == 0, "model.width", m.width, f"must be divisible by num_heads={m.num_heads}")
    _require(0 < c.loss.pkeep <= 1, "loss.pkeep", c.loss.pkeep, "must lie in (0, 1]")
    _require(0 <= c.loss.class_dropout < 1, "loss.class_dropout", c.loss.class_dropout, "must lie in [0, 1)")
    _require(c.loss.class_dropout == 0 or m.null_class, "loss.class_dropout", c.loss.class_dropout,
             "dropped labels become the null class: set model.null_class=True")
    _require(0 <= c.loss.label_smoothing < 1, "loss.label_smoothing", c.loss.label_smoothing, "must lie in [0, 1)")
    _require(c.loss.chunk_size > 0, "loss.chunk_size", c.loss.chunk_size, "must be positive")
    _require(s.temperature > 0, "sample.temperature", s.temperature, "must be positive")
    _require(s.top_k >= 0, "sample.top_k", s.top_k, "must be >= 0 (0: 10% of the codes)")
    _require(0 < s.top_p <= 1, "sample.top_p", s.top_p, "must lie in (0, 1]")
    _require(s.cfg_scale == 1.0 or m.null_class, "sample.cfg_scale", s.cfg_scale,
             "guidance needs the null class: set model.null_class=True (and train with loss.class_dropout > 0)")


def _validate_far(c: ml_collections.ConfigDict) -> None:
    from vqlc_jax.generators.sampling import CFG_SCHEDULES

    m, s = c.model, c.sample
    for key in ("num_layers", "num_heads", "width", "head_layers"):
        _require(m[key] > 0, f"model.{key}", m[key], "must be positive")
    _require(m.width % (4 * m.num_heads) == 0, "model.width", m.width,
             f"must be a multiple of 4 * num_heads={m.num_heads} (2-D RoPE needs a head dim divisible by 4)")
    _require(0 <= m.dropout < 1, "model.dropout", m.dropout, "must lie in [0, 1)")
    _require(m.num_codebooks >= 0, "model.num_codebooks", m.num_codebooks, "must be >= 0 (0: read off the data)")
    _require(not m.codebook_sizes or (min(m.codebook_sizes) > 0 and len(m.codebook_sizes) == (
        m.num_codebooks or len(m.codebook_sizes))), "model.codebook_sizes", tuple(m.codebook_sizes),
        f"must be () or num_codebooks={m.num_codebooks} positive sizes")
    _require(0 <= c.loss.class_dropout < 1, "loss.class_dropout", c.loss.class_dropout, "must lie in [0, 1)")
    _require(0 <= c.loss.label_smoothing < 1, "loss.label_smoothing", c.loss.label_smoothing, "must lie in [0, 1)")
    _require(c.loss.chunk_size > 0, "loss.chunk_size", c.loss.chunk_size, "must be positive")
    _require(s.temperature > 0, "sample.temperature", s.temperature, "must be positive")
    _require(s.top_k >= 0, "sample.top_k", s.top_k, "must be >= 0 (0: off)")
    _require(0 < s.top_p <= 1, "sample.top_p", s.top_p, "must lie in (0, 1]")
    _require(s.cfg_schedule in CFG_SCHEDULES, "sample.cfg_schedule", s.cfg_schedule,
             f"choices: {', '.join(CFG_SCHEDULES)}")
    _require(s.cfg_scale == 1.0 or c.loss.class_dropout > 0, "sample.cfg_scale", s.cfg_scale,
             "guidance needs a trained null class: train with loss.class_dropout > 0")


def _validate_latent(c: ml_collections.ConfigDict) -> None:
    from vqlc_jax.generators.latent import LATENT_SCALES

    m, s = c.model, c.sample
    if c.generator == "ldm":
        _require(m.preset in ("f16", "f8"), "model.preset", m.preset, "choices: f16, f8")
    else:
        from vqlc_jax.models.dit import DIT_SIZES

        _require(m.size in DIT_SIZES, "model.size", m.size, f"choices: {', '.join(DIT_SIZES)}")
        _require(m.patch_size > 0, "model.patch_size", m.patch_size, "must be positive")
    _require(0 <= c.loss.class_dropout < 1, "loss.class_dropout", c.loss.class_dropout, "must lie in [0, 1)")
    _require(c.loss.latent_scale in LATENT_SCALES, "loss.latent_scale", c.loss.latent_scale,
             f"choices: {', '.join(LATENT_SCALES)}")
    samplers = {"dit": ("ddpm", "ddim"), "sit": ("ode", "sde"), "ldm": ("ddim",)}[c.generator]
    _require(s.sampler in samplers, "sample.sampler", s.sampler, f"choices: {', '.join(samplers)}")
    if c.generator != "sit":
        _require(0 < s.steps <= c.diffusion.num_steps, "sample.steps", s.steps,
                 f"must lie in [1, diffusion.num_steps={c.diffusion.num_steps}]")
        _require(s.eta >= 0, "sample.eta", s.eta, "must be >= 0")
    else:
        _require(s.steps > 1, "sample.steps", s.steps, "must be > 1")
    _require(s.cfg_scale >= 1.0, "sample.cfg_scale", s.cfg_scale, "must be >= 1 (1: no guidance)")
    _require(s.cfg_scale == 1.0 or c.loss.class_dropout > 0, "sample.cfg_scale", s.cfg_scale,
             "guidance needs a trained null class: train with loss.class_dropout > 0")
    _require(s.cfg_channels >= 0, "sample.cfg_channels", s.cfg_channels, "must be >= 0 (0: every channel)")
    lo, hi = s.cfg_interval
    _require(0 <= lo < hi <= 1, "sample.cfg_interval", tuple(s.cfg_interval),
             "must be (lo, hi) noise levels with 0 <= lo < hi <= 1 ((0, 1): guidance at every step)")
