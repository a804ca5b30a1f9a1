"""The training loop every model family shares: `run(task, workdir)`.

A `Task` (the tokenizer trainer, the generator trainer) says how to build its state born sharded, where its batches
come from, what one step is, what to log and evaluate, and what to export at the end. The loop owns the rest, the
same for every family: orbax checkpoints (asynchronous, atomic; a run restarts from the newest one in `workdir`),
SIGTERM -> checkpoint and clean exit, a NaN/Inf loss stops the run naming the step (the last good checkpoint is
kept), `metrics.jsonl` + TensorBoard, progress with ETA.
"""

from __future__ import annotations

import abc
import json
import pathlib
import signal
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or Inf; the last good checkpoint is kept."""


def lr_schedule(peak: float, *, warmup_steps: int, total_steps: int, min_lr: float = 0.0,
                decay: str = "cosine") -> optax.Schedule:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then a cosine, linear or no decay to `min_lr` at
    `total_steps`."""
    warmup, total = max(warmup_steps, 1), max(total_steps, 2)
    if decay == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, min_lr)
    if decay == "linear":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                     optax.linear_schedule(peak, min_lr, max(total - warmup, 1))], [warmup])
    if decay == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                    [warmup])
    raise ValueError(f"learning-rate decay {decay!r}: choices: cosine, linear, constant")


LOOP_KEYS = ("total_steps", "log_every_steps", "checkpoint_every_steps", "eval_every_steps", "keep_checkpoints")


def add_loop_keys(c: ml_collections.ConfigDict, *, seed: int = 0, global_batch_size: int, total_steps: int,
                  log_every_steps: int = 100, checkpoint_every_steps: int = 2_000, eval_every_steps: int = 10_000,
                  keep_checkpoints: int = 3) -> ml_collections.ConfigDict:
    """The keys every trainer config has (the loop's and the batch's)."""
    c.seed, c.global_batch_size, c.total_steps = seed, global_batch_size, total_steps
    c.log_every_steps, c.checkpoint_every_steps = log_every_steps, checkpoint_every_steps
    c.eval_every_steps, c.keep_checkpoints = eval_every_steps, keep_checkpoints
    return c


def validate_loop_keys(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first of the batch and loop keys that is not a positive integer."""
    for key in ("global_batch_size", *LOOP_KEYS):
        if not (isinstance(c[key], int) and c[key] > 0):
            raise ValueError(f"config.{key}={c[key]!r}: must be a positive integer")


class Task(abc.ABC):
    """One model family's part of a run. `config` must hold `total_steps`, `log_every_steps`,
    `checkpoint_every_steps`, `eval_every_steps` and `keep_checkpoints`."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    state_shardings: Any

    @abc.abstractmethod
    def init_state(self) -> Any:
        """A fresh train state, born sharded (`jax.jit(init, out_shardings=self.state_shardings)`)."""

    @abc.abstractmethod
    def batches(self, start_step: int) -> Iterator[Any]:
        """This process's batches from `start_step` on; each has `epoch` and `end_of_epoch`."""

    @abc.abstractmethod
    def step(self, state: Any, batch: Any, step: int) -> tuple[Any, dict]:
        """Runs train step number `step` (from 1); returns (new state, device scalars)."""

    @abc.abstractmethod
    def learning_rate(self, step: int) -> float:
        """The learning rate update number `step - 1` used."""

    def log_values(self, state: Any) -> tuple[dict[str, float], Any]:
        """Extra values for a log line (and the state, e.g. with a usage window reset)."""
        return {}, state

    def end_of_epoch(self, state: Any, workdir: pathlib.Path) -> tuple[dict[str, float], Any]:
        """Values for the end-of-epoch line (empty: no line) and the state."""
        return {}, state

    @abc.abstractmethod
    def evaluate(self, state: Any, workdir: pathlib.Path, step: int, writer) -> dict[str, float]:
        """Periodic evaluation; returns the scalars it wrote."""

    def export(self, state: Any, workdir: pathlib.Path) -> None:
        """Writes the finished model (called once, after the last step, if `exported` was False at the start)."""

    def exported(self, workdir: pathlib.Path) -> bool:
        return True


# ----------------------------------------------------------------------------------------------------------------------
# Bookkeeping helpers
# ----------------------------------------------------------------------------------------------------------------------
def check_finite(pending: list[tuple[int, dict]]) -> None:
    """Raises NonFiniteLossError naming the first step with a NaN or Inf loss, and every such loss in it."""
    for step, metrics in pending:
        bad = {k: v for k, v in sorted(jax.device_get(metrics).items()) if not np.isfinite(v)}
        if bad:
            listed = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise NonFiniteLossError(f"step {step}: non-finite loss {listed}; stopping (the last good checkpoint "
                                     "is kept)")


def window_means(window: list[dict]) -> dict[str, float]:
    """Mean of each metric over the steps that report it (e.g. GAN terms only exist after disc_start)."""
    fetched = jax.device_get(window)
    keys = sorted({k for m in fetched for k in m})
    return {k: float(np.mean([m[k] for m in fetched if k in m])) for k in keys}


class Preemption:
    """Turns SIGTERM into a flag the loop checks at step boundaries (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting after this step.")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def checkpoint_manager(workdir: pathlib.Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def restore_or_init(task: Task, manager: ocp.CheckpointManager, step: int | None = None) -> Any:
    """The state of checkpoint `step` (default: the newest) restored with the task's shardings, else a fresh one."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return task.init_state()
    logging.info("Resuming from the checkpoint of step %d in %s.", step, manager.directory)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            jax.eval_shape(task.init_state), task.state_shardings)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def flat_config(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} for TensorBoard's hparams (non-scalars as strings)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class MetricsLog:
    """`metrics.jsonl` (process 0 only): one JSON line per call."""

    def __init__(self, workdir: pathlib.Path):
        self._file = (workdir / "metrics.jsonl").open("a") if jax.process_index() == 0 else None

    def write(self, values: dict) -> None:
        if self._file:
            self._file.write(json.dumps(values) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


# ----------------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------------
def run(task: Task, workdir: str | pathlib.Path, *, preemption: Any = None) -> dict[str, Any]:
    """Trains `task` to `config.total_steps` (resuming from `workdir` when it holds checkpoints), evaluates, exports.

    `preemption` (default: SIGTERM) is an object whose `requested` flag, read after each step, makes the run save a
    checkpoint and return; its `restore()` is called at the end. Returns the last logged metrics plus `status`:
    "done" or "preempted".
    """
    from clu import metric_writers, periodic_actions

    config = task.config
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)

    # ---- Set-up: state (born sharded or restored), data, writers. ------------------------------------------------------
    manager = checkpoint_manager(workdir, config.keep_checkpoints)
    state = restore_or_init(task, manager)
    start_step = int(jax.device_get(state.step))
    exported = task.exported(workdir)  # decided once, by every process alike
    batches = task.batches(start_step)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() != 0)
    if start_step == 0:
        writer.write_hparams(flat_config(config))
    log = MetricsLog(workdir)
    progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
    preemption = preemption or Preemption()
    pending: list[tuple[int, dict]] = []
    last: dict[str, Any] = {}
    window_start = time.time()
    status = "done"

    # ---- Train. -------------------------------------------------------------------------------------------------------
    try:
        with jax.set_mesh(task.mesh):
            for step in range(start_step + 1, config.total_steps + 1):
                batch = next(batches)
                state, metrics = task.step(state, batch, step)
                pending.append((step, metrics))
                progress(step)
                is_last = step == config.total_steps
                stop = preemption.requested

                if step % config.log_every_steps == 0 or is_last:
                    check_finite(pending)
                    values = window_means([m for _, m in pending])
                    extra, state = task.log_values(state)
                    values.update(extra)
                    values["lr"] = float(task.learning_rate(step))
                    values["steps_per_sec"] = len(pending) / max(time.time() - window_start, 1e-9)
                    pending, window_start = [], time.time()
                    last = {"step": step, **values}
                    writer.write_scalars(step, values)
                    log.write(last)

                if batch.end_of_epoch:
                    values, state = task.end_of_epoch(state, workdir)
                    if values:
                        writer.write_scalars(step, {f"epoch_{k}": v for k, v in values.items()})
                        log.write({"step": step, "epoch": batch.epoch, **values})

                if step % config.checkpoint_every_steps == 0 or is_last or stop:
                    check_finite(pending)
                    manager.save(step, args=ocp.args.StandardSave(state))
                if step % config.eval_every_steps == 0 or is_last:
                    last.update(task.evaluate(state, workdir, step, writer))
                if stop and not is_last:
                    status = "preempted"
                    break
    finally:
        close = getattr(batches, "close", None)
        if close:
            close()
        manager.wait_until_finished()
        preemption.restore()
        writer.flush()
        log.close()

    # ---- Export. ------------------------------------------------------------------------------------------------------
    if status == "done" and not exported:
        task.export(state, workdir)
    return {**last, "status": status}
