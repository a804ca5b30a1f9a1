"""Train a VQGAN-family tokenizer from a config: `train_and_evaluate(config, workdir)`.

The same code runs on one CPU, many devices and many hosts: the train state is born sharded on a (data, model)
mesh, the batch is split over `data`, the step is one jit with the state donated. Checkpoints (orbax) are
asynchronous and atomic; a run restarts from the newest one in `workdir`, and SIGTERM saves one and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from vqlc_jax import parallel
from vqlc_jax.models.discriminator import NLayerDiscriminator
from vqlc_jax.models.lpips import LPIPS
from vqlc_jax.models.vqgan import build_vqgan
from vqlc_jax.train import config as config_lib
from vqlc_jax.train.steps import LossConfig, StepFns, TrainState, train_step

# Rules for leaves to split over the `model` axis (regex on the '/'-joined path): the frozen codebook by rows.
PARTITION_RULES = ((r"model_state/codebook/quantizer/embedding", jax.sharding.PartitionSpec(parallel.MODEL, None)),)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or Inf; the last good checkpoint is kept."""


def lr_schedule(opt: ml_collections.ConfigDict, total_steps: int, peak: float) -> optax.Schedule:
    """Linear warm-up to `peak`, then a half-cycle cosine down to `min_lr` at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(opt.warmup_steps, 1), max(total_steps, 2), opt.min_lr)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int, peak: float) -> optax.GradientTransformation:
    """Adam as the release (betas 0.5/0.9, eps 1e-7, no weight decay, no clipping) on the schedule."""
    return optax.adam(lr_schedule(opt, total_steps, peak), b1=opt.b1, b2=opt.b2, eps=opt.eps)


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


def _load_codebook(config: ml_collections.ConfigDict) -> np.ndarray | None:
    if config.model.quantizer.name != "lc" or config.codebook_init == "random":
        return None
    from vqlc_jax.quantizers import load_codebook

    return load_codebook(config.codebook_path, expected_dim=config.model.quantizer.codebook_dim)


@dataclasses.dataclass
class Run:
    """What the loop needs, built once from the config."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    fns: StepFns
    state_shardings: Any
    lpips_vars: Any
    init_state: Any  # () -> TrainState, born sharded (jit with out_shardings)


def build_run(config: ml_collections.ConfigDict) -> Run:
    """Model, losses, optimizers and a sharded state initialiser for `config`."""
    config_lib.validate(config)
    mesh = parallel.make_mesh(config.mesh.model_axis)
    parallel.check_batch_size(config.global_batch_size, mesh)
    model = build_vqgan(config.model)
    disc = NLayerDiscriminator(n_layers=config.loss.disc_layers, ndf=config.loss.disc_ndf)
    lpips_apply, lpips_vars = load_lpips(config.loss)
    fns = StepFns(model=model, discriminator=disc,
                  optimizer=make_optimizer(config.optimizer, config.total_steps, config.optimizer.lr),
                  disc_optimizer=make_optimizer(config.optimizer, config.total_steps, config.optimizer.disc_lr),
                  lpips=lpips_apply, loss=LossConfig(**{f.name: config.loss[f.name]
                                                         for f in dataclasses.fields(LossConfig)}))
    res = config.data.resolution
    images = jnp.zeros((1, res, res, config.model.ddconfig.in_channels), jnp.float32)
    codebook = _load_codebook(config)
    num_codes = config.model.quantizer.num_codes

    def init(codebook: jax.Array | None) -> TrainState:
        key = jax.random.key(config.seed)
        k_model, k_disc, k_state = jax.random.split(key, 3)
        variables = dict(model.init(k_model, images))
        params = variables.pop("params")
        if codebook is not None:
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
    return Run(config, mesh, fns, shardings, lpips_vars, lambda: born_sharded(codebook))


# ----------------------------------------------------------------------------------------------------------------------
# Bookkeeping helpers
# ----------------------------------------------------------------------------------------------------------------------
def _check_finite(pending: list[tuple[int, dict]]) -> None:
    """Raises NonFiniteLossError naming the first step with a NaN or Inf loss, and every such loss in it."""
    for step, metrics in pending:
        bad = {k: v for k, v in sorted(jax.device_get(metrics).items()) if not np.isfinite(v)}
        if bad:
            listed = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise NonFiniteLossError(f"step {step}: non-finite loss {listed}; stopping (the last good checkpoint "
                                     "is kept)")


def _window_means(window: list[dict]) -> dict[str, float]:
    """Mean of each metric over the steps that report it (GAN terms only exist after disc_start)."""
    fetched = jax.device_get(window)
    keys = sorted({k for m in fetched for k in m})
    return {k: float(np.mean([m[k] for m in fetched if k in m])) for k in keys}


def _usage(counts: np.ndarray) -> dict[str, float]:
    from vqlc_jax.quantizers import perplexity, utilization

    return {"utilization": float(utilization(counts)), "perplexity": float(perplexity(counts))}


class _Preemption:
    """Turns SIGTERM into a flag the loop checks at step boundaries (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting after this step.")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _checkpoint_manager(workdir: pathlib.Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def _restore_or_init(run: Run, manager: ocp.CheckpointManager) -> TrainState:
    latest = manager.latest_step()
    if latest is None:
        return run.init_state()
    logging.info("Resuming from the checkpoint of step %d in %s.", latest, manager.directory)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            jax.eval_shape(run.init_state), run.state_shardings)
    return manager.restore(latest, args=ocp.args.StandardRestore(abstract))


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
    result = evaluate_lib.evaluate_tokenizer(
        run.fns.model, tokenizer_variables(state), config.data, num_codes=config.model.quantizer.num_codes,
        batch_size=config.global_batch_size, mesh=run.mesh,
        lpips=(run.fns.lpips, run.lpips_vars) if run.fns.lpips else None)
    scalars = {f"eval/{k}": v for k, v in result.scalars.items()}
    writer.write_scalars(step, scalars)
    if jax.process_index() == 0:
        grid = evaluate_lib.save_grid(result.originals, result.reconstructions, workdir / f"recon_{step:07d}.png")
        writer.write_images(step, {"eval/reconstructions": grid[None]})
        np.save(workdir / "eval_code_counts.npy", result.counts)
    return scalars


# ----------------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       preemption: Any = None) -> dict[str, Any]:
    """Trains (resuming from `workdir` when it holds checkpoints), evaluates, and exports the tokenizer.

    `preemption` (default: SIGTERM) is an object whose `requested` flag, read after each step, makes the run save a
    checkpoint and return; its `restore()` is called at the end. Returns the last logged metrics plus `status`:
    "done" or "preempted".
    """
    from clu import metric_writers, periodic_actions

    from vqlc_jax import data as data_lib

    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0

    # ---- Set-up: model, state (born sharded or restored), data, writers. --------------------------------------------
    run = build_run(config)
    manager = _checkpoint_manager(workdir, config.keep_checkpoints)
    state = _restore_or_init(run, manager)
    start_step = int(jax.device_get(state.step))
    export_exists = (workdir / "tokenizer").exists()  # decided once, by every process alike
    pipeline = data_lib.make_pipeline(
        data_lib.make_source(config.data.name, "train", config.data.options), resolution=config.data.resolution,
        global_batch_size=config.global_batch_size, seed=config.seed, train=True,
        process_index=jax.process_index(), process_count=jax.process_count(), start_step=start_step)
    batches = iter(pipeline)
    images_sharding = parallel.batch_sharding(run.mesh)

    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    if start_step == 0:
        writer.write_hparams(_flat_config(config))
    metrics_file = (workdir / "metrics.jsonl").open("a") if is_main else None
    progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)

    step_fns = {
        use_gan: jax.jit(
            lambda s, x, lp, use_gan=use_gan: train_step(run.fns, s, x, lp, use_gan=use_gan),
            in_shardings=(run.state_shardings, images_sharding, parallel.replicated(run.mesh)),
            out_shardings=(run.state_shardings, parallel.replicated(run.mesh)),
            donate_argnums=(0,))
        for use_gan in (False, True)
    }
    schedule = lr_schedule(config.optimizer, config.total_steps, config.optimizer.lr)
    preemption = preemption or _Preemption()
    pending: list[tuple[int, dict]] = []
    last: dict[str, Any] = {}
    window_start = time.time()
    status = "done"

    # ---- Train. -------------------------------------------------------------------------------------------------------
    try:
        with jax.set_mesh(run.mesh):
            for step in range(start_step + 1, config.total_steps + 1):
                batch = next(batches)
                images = parallel.global_batch(batch.image, images_sharding)
                state, metrics = step_fns[step > config.loss.disc_start](state, images, run.lpips_vars)
                pending.append((step, metrics))
                progress(step)
                is_last = step == config.total_steps
                stop = preemption.requested
                end_of_epoch = batch.end_of_epoch

                if step % config.log_every_steps == 0 or is_last:
                    _check_finite(pending)
                    values = _window_means([m for _, m in pending])
                    counts = np.asarray(jax.device_get(state.window_counts))
                    values.update({f"window_{k}": v for k, v in _usage(counts).items()})
                    values["lr"] = float(schedule(step - 1))  # step s (from 1) applied update number s - 1
                    values["steps_per_sec"] = len(pending) / max(time.time() - window_start, 1e-9)
                    values["skipped_images"] = pipeline.skipped.count
                    state = state.replace(window_counts=jnp.zeros_like(state.window_counts))
                    pending, window_start = [], time.time()
                    last = {"step": step, **values}
                    writer.write_scalars(step, values)
                    if metrics_file:
                        metrics_file.write(json.dumps(last) + "\n")
                        metrics_file.flush()

                if end_of_epoch:
                    epoch_usage = _usage(np.asarray(jax.device_get(state.epoch_counts)))
                    writer.write_scalars(step, {f"epoch_{k}": v for k, v in epoch_usage.items()})
                    if metrics_file:
                        epoch = {"step": step, "epoch": batch.epoch, **epoch_usage}
                        metrics_file.write(json.dumps(epoch) + "\n")
                        metrics_file.flush()
                        np.save(workdir / "epoch_code_counts.npy", np.asarray(jax.device_get(state.epoch_counts)))
                    state = state.replace(epoch_counts=jnp.zeros_like(state.epoch_counts))

                if step % config.checkpoint_every_steps == 0 or is_last or stop:
                    _check_finite(pending)
                    manager.save(step, args=ocp.args.StandardSave(state))
                if step % config.eval_every_steps == 0 or is_last:
                    last.update(evaluate(run, state, workdir, step, writer))
                if stop and not is_last:
                    status = "preempted"
                    break
    finally:
        manager.wait_until_finished()
        preemption.restore()
        writer.flush()
        if metrics_file:
            metrics_file.close()

    # ---- Export. ------------------------------------------------------------------------------------------------------
    if status == "done" and not export_exists:
        export_tokenizer(config, state, workdir / "tokenizer")
    return {**last, "status": status}


def _flat_config(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
