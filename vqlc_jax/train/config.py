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
    # The same for the `lc` branches of a factorized (`fq`) model: {branch: codebook file}.
    c.codebook_paths = {}

    c.loss = ml_collections.ConfigDict(dict(
        reconstruction="l1", reconstruction_weight=1.0, quant_weight=0.1, lpips_weight=1.0,
        # Converted LPIPS weights (.npz, see README); "" or a missing file trains without LPIPS only if allowed.
        lpips_path="", allow_missing_lpips=False,
        disc_start=20_000, disc_weight=0.1, disc_factor=1.0, adaptive_weight=True, adaptive_weight_max=1e4,
        disc_layers=2, disc_ndf=64,
        # Factorized (`fq`) models only: disentanglement weight, and InfoNCE weight against the frozen teacher of
        # each branch with a FeatPredHead, {branch: {"name": "clip" | "dinov2", "path": Hugging Face folder}},
        # fed the images nearest-resized to `teacher_size` (the release: 224).
        disentangle_weight=0.1, semantic_weight=0.5, teachers={}, teacher_size=224))
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=5e-4, min_lr=0.0, warmup_steps=5 * steps_per_epoch, decay="cosine", b1=0.5, b2=0.9, eps=1e-7,
        disc_lr=5e-4, grad_clip=0.0))
    c.mesh = ml_collections.ConfigDict(dict(model_axis=1))
    return c


def fqgan_config(branches: dict[str, dict], teachers: dict[str, tuple[str, int]]) -> ml_collections.ConfigDict:
    """FQGAN's recipe (the release's `train_fqgan_dual.sh`, LlamaGen's trainer) on ImageNet 256 px, f16.

    `branches` {name: quantizer options} in token order (each `l2vq` with 16,384 codes of dim 8 as released, or
    any other quantizer, e.g. `lc`); `teachers` {branch: (teacher name, its feature width)} adds a FeatPredHead
    (3 layers, 8 heads) of that width to the branch, and its teacher folder goes to `loss.teachers.<branch>.path`.
    Adapter: 6 layers, 8 heads, width ch * ch_mult[-1] = 512. L2 reconstruction, LPIPS 1, quantization losses
    summed over branches with weight 1, disentanglement 0.1, InfoNCE 0.5, hinge PatchGAN (3 layers) weight 0.5 from
    step 20K with no adaptive weight, Adam (0.9, 0.95) lr 2e-4 constant for D and G, grad clip 1, batch 256, 40
    epochs."""
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // 256
    c = base_config()
    c.total_steps = 40 * steps_per_epoch
    c.model.ddconfig.update(attn_resolutions=(16,), dropout=0.0)
    c.model.quantizer = ml_collections.ConfigDict(dict(
        name="fq", branches=[{"name": name, "quantizer": dict(q)} for name, q in branches.items()]))
    c.model.fq = ml_collections.ConfigDict(dict(adapter_layers=6, adapter_heads=8, feat_heads={
        name: dict(width=width, num_layers=3, num_heads=8) for name, (_, width) in teachers.items()}))
    c.loss.update(reconstruction="l2", quant_weight=1.0, disc_start=20_000, disc_weight=0.5, adaptive_weight=False,
                  disc_layers=3, disentangle_weight=0.1, semantic_weight=0.5)
    c.loss.teachers = {name: {"name": teacher, "path": ""} for name, (teacher, _) in teachers.items()}
    c.optimizer.update(lr=2e-4, disc_lr=2e-4, warmup_steps=0, decay="constant", b1=0.9, b2=0.95, eps=1e-8,
                       grad_clip=1.0)
    return c


L2VQ_16K = dict(name="l2vq", num_codes=16_384, alpha=0.25, beta=1.0, entropy_weight=0.03, entropy_temperature=0.01)
DECAYS = ("cosine", "linear", "constant")


def _require(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        raise ValueError(f"config.{key}={value!r}: {why}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first key whose value cannot work."""
    loop.validate_loop_keys(c)
    q = c.model.quantizer
    _require(q.name in QUANTIZERS, "model.quantizer.name", q.name, f"choices: {', '.join(QUANTIZERS)}")
    if q.name == "fq":
        _validate_fq(c)
    else:
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
    for key in ("reconstruction_weight", "quant_weight", "lpips_weight", "disc_weight", "disc_factor",
                "disentangle_weight", "semantic_weight"):
        _require(c.loss[key] >= 0, f"loss.{key}", c.loss[key], "must be >= 0")
    _require(c.loss.disc_start >= 0, "loss.disc_start", c.loss.disc_start, "must be >= 0")
    _require(c.loss.teacher_size > 0, "loss.teacher_size", c.loss.teacher_size, "must be positive")
    _require(c.optimizer.lr > 0, "optimizer.lr", c.optimizer.lr, "must be positive")
    _require(c.optimizer.decay in DECAYS, "optimizer.decay", c.optimizer.decay, f"choices: {', '.join(DECAYS)}")
    _require(c.optimizer.grad_clip >= 0, "optimizer.grad_clip", c.optimizer.grad_clip, "must be >= 0 (0: off)")
    _require(0 <= c.optimizer.warmup_steps <= c.total_steps, "optimizer.warmup_steps", c.optimizer.warmup_steps,
             f"must lie in [0, total_steps={c.total_steps}]")


def _validate_fq(c: ml_collections.ConfigDict) -> None:
    """A factorized model's branches (checked by the quantizer) and its teachers (`loss.teachers`)."""
    from vqlc_jax.models.teachers import TEACHERS
    from vqlc_jax.quantizers.fq import branch_specs

    names = [name for name, _ in branch_specs(c.model.quantizer.branches)]
    for name, teacher in c.loss.teachers.items():
        _require(name in names, f"loss.teachers.{name}", teacher.to_dict(), f"not a branch of {names}")
        _require(sorted(teacher) == ["name", "path"] and teacher.name in TEACHERS, f"loss.teachers.{name}",
                 teacher.to_dict(), f"expected {{'name': one of {list(TEACHERS)}, 'path': a Hugging Face folder}}")
