"""The tokenizer trainer's config: defaults shared by every experiment file, and the check run at start-up.

An experiment file (`configs/*.py`) starts from `base_config()` and overrides what it needs; the dict is locked,
so a mistyped key (in the file or as `--config.key=value`) fails at once with the key named.
"""

from __future__ import annotations

import ml_collections

from vqlc_jax.quantizers import QUANTIZERS
from vqlc_jax.train import loop

IMAGENET_TRAIN_IMAGES = 1_281_167
F16_DDCONFIG = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0)


def base_config() -> ml_collections.ConfigDict:
    """The paper's VQGAN-LC f16 recipe on ImageNet: 100K codebook, D'=8, linear projector, 20 epochs at global
    batch 256 with 5 warm-up epochs."""
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // 256
    c = loop.add_loop_keys(ml_collections.ConfigDict(), global_batch_size=256, total_steps=20 * steps_per_epoch)

    c.data = ml_collections.ConfigDict(dict(name="imagenet2012", options={"data_dir": ""}, resolution=256,
                                            eval_split="validation", eval_max_images=0))
    c.model = ml_collections.ConfigDict(dict(
        ddconfig=dict(F16_DDCONFIG), embed_dim=8,
        quantizer=dict(name="lc", num_codes=100_000, codebook_dim=768, projector="linear", alpha=1.0, beta=0.33,
                       chunk_size=16_384)))
    # Frozen codebook file for `lc` (.npy from `vqlc_jax.codebook.build`, or an official .pth); required for `lc`
    # unless `codebook_init` is "random" (the paper's random-codebook ablation).
    c.codebook_path = ""
    c.codebook_init = "file"

    c.loss = ml_collections.ConfigDict(dict(
        reconstruction="l1", reconstruction_weight=1.0, quant_weight=0.1, lpips_weight=1.0,
        # Converted LPIPS weights (.npz, see README); "" or a missing file trains without LPIPS only if allowed.
        lpips_path="", allow_missing_lpips=False,
        disc_start=20_000, disc_weight=0.1, disc_factor=1.0, adaptive_weight_max=1e4, disc_layers=2, disc_ndf=64))
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=5e-4, min_lr=0.0, warmup_steps=5 * steps_per_epoch, b1=0.5, b2=0.9, eps=1e-7, disc_lr=5e-4))
    c.mesh = ml_collections.ConfigDict(dict(model_axis=1))
    return c


def _require(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        raise ValueError(f"config.{key}={value!r}: {why}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first key whose value cannot work."""
    loop.validate_loop_keys(c)
    q = c.model.quantizer
    _require(q.name in QUANTIZERS, "model.quantizer.name", q.name, f"choices: {', '.join(QUANTIZERS)}")
    _require(q.num_codes > 0, "model.quantizer.num_codes", q.num_codes, "must be positive")
    _require(c.model.embed_dim > 0, "model.embed_dim", c.model.embed_dim, "must be positive")
    res, f = c.data.resolution, 2 ** (len(c.model.ddconfig.ch_mult) - 1)
    _require(res > 0 and res % f == 0, "data.resolution", res, f"must be a positive multiple of the factor {f}")
    _require(c.codebook_init in ("file", "random"), "codebook_init", c.codebook_init, "choices: file, random")
    if q.name == "lc" and c.codebook_init == "file":
        _require(bool(c.codebook_path), "codebook_path", c.codebook_path,
                 "the lc quantizer needs a codebook file (or set codebook_init='random'); build one first, e.g. "
                 "`python -m vqlc_jax.codebook.build --config configs/codebook/demo.py --workdir W/codebook` for "
                 "configs/demo.py, then pass --config.codebook_path=W/codebook/codebook.npy (./run_demo.sh does both)")
    _require(c.loss.reconstruction in ("l1", "l2"), "loss.reconstruction", c.loss.reconstruction, "choices: l1, l2")
    for key in ("reconstruction_weight", "quant_weight", "lpips_weight", "disc_weight", "disc_factor"):
        _require(c.loss[key] >= 0, f"loss.{key}", c.loss[key], "must be >= 0")
    _require(c.loss.disc_start >= 0, "loss.disc_start", c.loss.disc_start, "must be >= 0")
    _require(c.optimizer.lr > 0, "optimizer.lr", c.optimizer.lr, "must be positive")
    _require(0 <= c.optimizer.warmup_steps <= c.total_steps, "optimizer.warmup_steps", c.optimizer.warmup_steps,
             f"must lie in [0, total_steps={c.total_steps}]")
