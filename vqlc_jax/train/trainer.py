"""Train a VQGAN-family tokenizer from a config: `train_and_evaluate(config, workdir)`.

The same code runs on one CPU, many devices and many hosts: the train state is born sharded on a (data, model)
mesh, the batch is split over `data`, the step is one jit with the state donated. The loop, checkpoints, preemption
and logging are the shared ones of `train.loop`; this module is the tokenizer's `Task`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vqlc_jax import parallel
from vqlc_jax.models.discriminator import NLayerDiscriminator
from vqlc_jax.models.lpips import LPIPS
from vqlc_jax.models.build import build_model
from vqlc_jax.train import config as config_lib
from vqlc_jax.train import loop
from vqlc_jax.train.loop import NonFiniteLossError  # noqa: F401  (re-exported)
from vqlc_jax.train.steps import LossConfig, StepFns, TrainState, train_step

# Rules for leaves to split over the `model` axis (regex on the '/'-joined path): the frozen codebook by rows.
# A factorized model's `lc` branches keep theirs at `quantizer/<branch>/embedding`.
PARTITION_RULES = ((r"model_state/codebook/quantizer(/[^/]+)?/embedding",
                    jax.sharding.PartitionSpec(parallel.MODEL, None)),)


def lr_schedule(opt: ml_collections.ConfigDict, total_steps: int, peak: float) -> optax.Schedule:
    """Linear warm-up to `peak`, then `opt.decay` (cosine, linear or constant) down to `min_lr` at `total_steps`."""
    return loop.lr_schedule(peak, warmup_steps=opt.warmup_steps, total_steps=total_steps, min_lr=opt.min_lr,
                            decay=opt.decay)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int, peak: float) -> optax.GradientTransformation:
    """Adam as the release (betas 0.5/0.9, eps 1e-7, no weight decay) on the schedule; gradients clipped to a
    global norm of `opt.grad_clip` first when it is > 0 (FQGAN: 1.0; VQGAN-LC: none)."""
    adam = optax.adam(lr_schedule(opt, total_steps, peak), b1=opt.b1, b2=opt.b2, eps=opt.eps)
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), adam) if opt.grad_clip > 0 else adam


def load_lpips(loss_cfg: ml_collections.ConfigDict):
    """(apply fn, variables) of LPIPS from `loss.lpips_path`, or (None, None) where allowed and absent."""
    from vqlc_jax.convert.lpips_weights import load_lpips_variables

    path = pathlib.Path(loss_cfg.lpips_path) if loss_cfg.lpips_path else None
    if loss_cfg.lpips_weight == 0:
        return None, None
    if path is None or not path.is_file():
        reason = f"LPIPS weights not found at {str(path)!r}" if path else "loss.lpips_path is not set"
        if not loss_cfg.allow_missing_lpips:
            raise FileNotFoundError(f"{reason}; convert them (see README) or set loss.allow_missing_lpips=True")
        logging.warning("%s: training WITHOUT the LPIPS loss (loss.allow_missing_lpips=True).", reason)
        return None, None
    return LPIPS().apply, load_lpips_variables(path)


def _load_codebook(config: ml_collections.ConfigDict) -> np.ndarray | dict[str, np.ndarray] | None:
    """The frozen `lc` codebook, or {branch: codebook} for a factorized model's `lc` branches
    (`codebook_paths.<branch>`); None with `codebook_init='random'`."""
    from vqlc_jax.quantizers import load_codebook

    q = config.model.quantizer
    if config.codebook_init == "random" or q.name not in ("lc", "fq"):
        return None
    if q.name == "lc":
        return load_codebook(config.codebook_path, expected_dim=q.codebook_dim)
    codebooks = {}
    for branch in q.branches:
        if branch["quantizer"]["name"] != "lc":
            continue
        path = config.codebook_paths.get(branch["name"], "")
        if not path:
            raise ValueError(f"config.codebook_paths.{branch['name']}={path!r}: the lc branch {branch['name']!r} "
                             "needs a codebook file (or set codebook_init='random')")
        codebooks[branch["name"]] = load_codebook(path, expected_dim=branch["quantizer"]["codebook_dim"])
    return codebooks or None


def load_teachers(config: ml_collections.ConfigDict, model) -> tuple[tuple, dict]:
    """((branch, Teacher), ...) and {branch: frozen variables} from `loss.teachers` {branch: {name, path}}.

    Every branch with a FeatPredHead (`model.fq.feat_heads`) needs a teacher of the head's width, and every teacher
    a head; none are loaded when `loss.semantic_weight` is 0."""
    from vqlc_jax.models.teachers import load_teacher

    specs = dict(config.loss.teachers)
    heads = {name: width for name, width, _, _ in getattr(model, "feat_head_specs", ())}
    if config.loss.semantic_weight == 0 or not (specs or heads):
        return (), {}
    for name in sorted(set(heads) ^ set(specs)):
        where = "loss.teachers" if name in heads else "model.fq.feat_heads"
        raise ValueError(f"branch {name!r}: a teacher and a FeatPredHead go together, but {where}.{name} is missing "
                         f"(teachers: {sorted(specs)}, feature heads: {sorted(heads)})")
    teachers, variables = [], {}
    for name in sorted(specs):
        spec = dict(specs[name])
        teacher, variables[name] = load_teacher(spec["name"], spec["path"], size=config.loss.teacher_size)
        if teacher.width != heads[name]:
            raise ValueError(f"branch {name!r}: the teacher {spec['name']!r} from {spec['path']!r} gives features of "
                             f"width {teacher.width}, but model.fq.feat_heads.{name}.width is {heads[name]}")
        teachers.append((name, teacher))
    return tuple(teachers), variables


@dataclasses.dataclass
class Run:
    """What the loop needs, built once from the config."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    fns: StepFns
    state_shardings: Any
    lpips_vars: Any
    init_state: Any  # () -> TrainState, born sharded (jit with out_shardings)
    teacher_vars: Any = None  # {branch: frozen teacher variables}, replicated


def codebook_layout(model) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(names, sizes) of a factorized model's sub-codebooks; ((), ()) for one codebook."""
    from vqlc_jax.quantizers import FQQuantizer

    if isinstance(model.quantizer, FQQuantizer):
        return model.quantizer.names, model.quantizer.codebook_sizes
    return (), ()


def build_run(config: ml_collections.ConfigDict) -> Run:
    """Model, losses, optimizers and a sharded state initialiser for `config`."""
    config_lib.validate(config)
    mesh = parallel.make_mesh(config.mesh.model_axis)
    parallel.check_batch_size(config.global_batch_size, mesh)
    model = build_model(config.model)
    disc = NLayerDiscriminator(n_layers=config.loss.disc_layers, ndf=config.loss.disc_ndf)
    lpips_apply, lpips_vars = load_lpips(config.loss)
    teachers, teacher_vars = load_teachers(config, model)
    names, sizes = codebook_layout(model)
    fns = StepFns(model=model, discriminator=disc, teachers=teachers, codebook_sizes=sizes,
                  optimizer=make_optimizer(config.optimizer, config.total_steps, config.optimizer.lr),
                  disc_optimizer=make_optimizer(config.optimizer, config.total_steps, config.optimizer.disc_lr),
                  lpips=lpips_apply, loss=LossConfig(**{f.name: config.loss[f.name]
                                                         for f in dataclasses.fields(LossConfig)}))
    res = config.data.resolution
    images = jnp.zeros((1, res, res, config.model.ddconfig.in_channels), jnp.float32)
    codebook = _load_codebook(config)
    num_codes = sum(sizes) if names else config.model.quantizer.num_codes

    def init(codebook: jax.Array | None) -> TrainState:
        key = jax.random.key(config.seed)
        k_model, k_disc, k_state = jax.random.split(key, 3)
        variables = dict(model.init(k_model, images))
        params = variables.pop("params")
        if isinstance(codebook, dict):
            for name, value in codebook.items():
                variables["codebook"]["quantizer"][name]["embedding"] = jnp.asarray(value)
        elif codebook is not None:
            variables["codebook"] = {"quantizer": {"embedding": jnp.asarray(codebook)}}
        disc_vars = disc.init(k_disc, images)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
            opt_state=fns.optimizer.init(params), disc_params=disc_vars["params"],
            disc_stats=disc_vars["batch_stats"], disc_opt_state=fns.disc_optimizer.init(disc_vars["params"]),
            window_counts=jnp.zeros((num_codes,), jnp.int32), epoch_counts=jnp.zeros((num_codes,), jnp.int32),
            rng=k_state)

    abstract = jax.eval_shape(init, codebook)
    shardings = parallel.tree_shardings(mesh, abstract, PARTITION_RULES)
    # The codebook is an argument, not a constant baked into the program (100K x 768 floats).
    born_sharded = jax.jit(init, out_shardings=shardings)
    lpips_vars = jax.device_put(lpips_vars, parallel.replicated(mesh)) if lpips_vars is not None else None
    teacher_vars = jax.device_put(teacher_vars, parallel.replicated(mesh)) if teacher_vars else None
    return Run(config, mesh, fns, shardings, lpips_vars, lambda: born_sharded(codebook), teacher_vars)


def _usage(counts: np.ndarray, names: tuple[str, ...] = (), sizes: tuple[int, ...] = ()) -> dict[str, float]:
    """Utilization and perplexity of the counts, and of each sub-codebook's part (`utilization_<name>`, ...)."""
    from vqlc_jax.quantizers import perplexity, utilization

    values = {"utilization": float(utilization(counts)), "perplexity": float(perplexity(counts))}
    for name, part in zip(names, np.split(counts, np.cumsum(sizes, dtype=int)[:-1])):
        values.update({f"utilization_{name}": float(utilization(part)), f"perplexity_{name}": float(perplexity(part))})
    return values


def tokenizer_variables(state: TrainState) -> dict:
    """The variables `Tokenizer` takes, from a train state."""
    return {"params": state.params, **state.model_state}


def export_tokenizer(config: ml_collections.ConfigDict, state: TrainState, directory: pathlib.Path):
    """Writes the trained tokenizer in the `Tokenizer.save` format (read back by `Tokenizer.load`)."""
    from vqlc_jax.tokenizer import Tokenizer

    return Tokenizer(config.model.to_dict(), tokenizer_variables(state)).save(directory)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation during training
# ----------------------------------------------------------------------------------------------------------------------
def evaluate(run: Run, state: TrainState, workdir: pathlib.Path, step: int, writer) -> dict[str, float]:
    """Reconstruction metrics and codebook usage over the validation split; writes a reconstruction grid."""
    from vqlc_jax import evaluate as evaluate_lib

    config = run.config
    names, sizes = codebook_layout(run.fns.model)
    result = evaluate_lib.evaluate_tokenizer(
        run.fns.model, tokenizer_variables(state), config.data, num_codes=sizes or config.model.quantizer.num_codes,
        batch_size=config.global_batch_size, mesh=run.mesh,
        lpips=(run.fns.lpips, run.lpips_vars) if run.fns.lpips else None, codebook_names=names)
    scalars = {f"eval/{k}": v for k, v in result.scalars.items()}
    writer.write_scalars(step, scalars)
    if jax.process_index() == 0:
        grid = evaluate_lib.save_grid(result.originals, result.reconstructions, workdir / f"recon_{step:07d}.png",
                                      caption=f"step {step}: {evaluate_lib.grid_caption(result.scalars)}")
        writer.write_images(step, {"eval/reconstructions": grid[None]})
        np.save(workdir / "eval_code_counts.npy", result.counts)
    return scalars


# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer's part of the shared loop
# ----------------------------------------------------------------------------------------------------------------------
class TokenizerTask(loop.Task):
    """Batches of images, the autoencoder + GAN step (GAN terms from `loss.disc_start`), codebook usage per log
    window and per epoch, reconstruction evaluation, and the exported `Tokenizer`."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.run = build_run(config)
        self.config, self.mesh, self.state_shardings = config, self.run.mesh, self.run.state_shardings
        self.images_sharding = parallel.batch_sharding(self.mesh)
        self.schedule = lr_schedule(config.optimizer, config.total_steps, config.optimizer.lr)
        self.pipeline = None
        self.layout = codebook_layout(self.run.fns.model)
        replicated = parallel.replicated(self.mesh)
        self._steps = {
            use_gan: jax.jit(
                lambda s, x, lp, tv, use_gan=use_gan: train_step(self.run.fns, s, x, lp, use_gan=use_gan,
                                                                 teacher_vars=tv),
                in_shardings=(self.state_shardings, self.images_sharding, replicated, replicated),
                out_shardings=(self.state_shardings, parallel.replicated(self.mesh)),
                donate_argnums=(0,))
            for use_gan in (False, True)
        }

    def init_state(self) -> TrainState:
        return self.run.init_state()

    def batches(self, start_step: int):
        from vqlc_jax import data as data_lib

        c = self.config
        self.pipeline = data_lib.make_pipeline(
            data_lib.make_source(c.data.name, "train", c.data.options), resolution=c.data.resolution,
            global_batch_size=c.global_batch_size, seed=c.seed, train=True, process_index=jax.process_index(),
            process_count=jax.process_count(), start_step=start_step)
        return iter(self.pipeline)

    def step(self, state: TrainState, batch, step: int):
        images = parallel.global_batch(batch.image, self.images_sharding)
        return self._steps[step > self.config.loss.disc_start](state, images, self.run.lpips_vars,
                                                                self.run.teacher_vars)

    def learning_rate(self, step: int) -> float:
        return float(self.schedule(step - 1))  # step s (from 1) applied update number s - 1

    def log_values(self, state: TrainState):
        counts = np.asarray(jax.device_get(state.window_counts))
        values = {f"window_{k}": v for k, v in _usage(counts, *self.layout).items()}
        values["skipped_images"] = self.pipeline.skipped.count
        return values, state.replace(window_counts=jnp.zeros_like(state.window_counts))

    def end_of_epoch(self, state: TrainState, workdir: pathlib.Path):
        counts = np.asarray(jax.device_get(state.epoch_counts))
        if jax.process_index() == 0:
            np.save(workdir / "epoch_code_counts.npy", counts)
        return _usage(counts, *self.layout), state.replace(epoch_counts=jnp.zeros_like(state.epoch_counts))

    def evaluate(self, state: TrainState, workdir: pathlib.Path, step: int, writer) -> dict[str, float]:
        return evaluate(self.run, state, workdir, step, writer)

    def exported(self, workdir: pathlib.Path) -> bool:
        return (workdir / "tokenizer").exists()

    def export(self, state: TrainState, workdir: pathlib.Path) -> None:
        export_tokenizer(self.config, state, workdir / "tokenizer")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       preemption: Any = None) -> dict[str, Any]:
    """Trains (resuming from `workdir` when it holds checkpoints), evaluates, and exports the tokenizer to
    `workdir/tokenizer`; see `train.loop.run` for `preemption` and the result."""
    return loop.run(TokenizerTask(config), workdir, preemption=preemption)
