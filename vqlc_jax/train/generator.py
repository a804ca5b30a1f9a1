"""Train a generator (the family `config.generator` names) on an encoded dataset: `train_and_evaluate(config, workdir)`.

The generator's `Task` for the shared loop (`train.loop`): state born sharded on the (data, model) mesh, one jitted
step with the state donated (AdamW with warm-up and decay, gradient clipping, EMA of the weights inside the step),
batches from the encoded dataset's deterministic reader (resumable by step, process-sharded), a PNG grid of decoded
samples and the generation utilization at each evaluation, and the finished generator exported to
`workdir/generator` (`vqlc_jax.generators.Generator.load`).
"""

from __future__ import annotations

import pathlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vqlc_jax import metrics, parallel
from vqlc_jax.generators import config as config_lib
from vqlc_jax.generators.family import Family, make_family
from vqlc_jax.generators.sampling import class_balanced_labels
from vqlc_jax.train import loop

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class GenState:
    """Everything a generator run carries from step to step (and checkpoints). The data position is `step`."""

    step: Array
    params: PyTree
    ema_params: PyTree
    opt_state: PyTree
    rng: Array


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (`grad_clip` > 0), then AdamW on the warm-up + decay schedule; weight decay on
    matrices only (ndim >= 2: no biases, norms or scalars)."""
    schedule = loop.lr_schedule(opt.lr, warmup_steps=opt.warmup_steps, total_steps=total_steps, min_lr=opt.min_lr,
                                decay=opt.decay)
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw) if opt.grad_clip > 0 else adamw


def ema_update(ema: PyTree, params: PyTree, decay: float) -> PyTree:
    """decay * ema + (1 - decay) * params, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema, params)


def train_step(family: Family, optimizer: optax.GradientTransformation, ema_decay: float, state: GenState,
               batch: dict[str, Array]) -> tuple[GenState, dict[str, Array]]:
    """One optimisation step on a (sharded) batch; the EMA follows the updated weights."""
    rng = jax.random.fold_in(state.rng, state.step)
    (_, metrics), grads = jax.value_and_grad(family.loss, has_aux=True)(state.params, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema_update(state.ema_params, params, ema_decay)), metrics


def grid_labels(num_classes: int, classes: int, per_class: int) -> np.ndarray:
    """`classes` class ids spread evenly over [0, num_classes), each repeated `per_class` times (one grid row)."""
    chosen = np.unique(np.linspace(0, num_classes - 1, min(classes, num_classes)).round().astype(np.int32))
    return np.repeat(chosen, per_class)


class GeneratorTask(loop.Task):
    """A generator family on the shared loop."""

    def __init__(self, config: ml_collections.ConfigDict):
        from vqlc_jax.data.encoded import open_encoded

        config_lib.validate(config)
        self.config = config
        self.dataset = open_encoded(config.data.encoded_dir)
        self.family = make_family(config, self.dataset)
        if config.eval.num_samples % self.family.num_classes:
            raise ValueError(f"config.eval.num_samples={config.eval.num_samples}: must be a multiple of the "
                             f"{self.family.num_classes} classes of {config.data.encoded_dir} (class-balanced)")
        self.mesh = parallel.make_mesh(config.mesh.model_axis)
        parallel.check_batch_size(config.global_batch_size, self.mesh)
        self.optimizer = make_optimizer(config.optimizer, config.total_steps)
        self.schedule = loop.lr_schedule(config.optimizer.lr, warmup_steps=config.optimizer.warmup_steps,
                                         total_steps=config.total_steps, min_lr=config.optimizer.min_lr,
                                         decay=config.optimizer.decay)
        self.rows = parallel.batch_sharding(self.mesh)
        replicated = parallel.replicated(self.mesh)

        def init() -> GenState:
            k_params, k_state = jax.random.split(jax.random.key(config.seed))
            params = self.family.init_params(k_params)
            return GenState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                            opt_state=self.optimizer.init(params), rng=k_state)

        self.state_shardings = parallel.tree_shardings(self.mesh, jax.eval_shape(init))
        self._init = jax.jit(init, out_shardings=self.state_shardings)
        self._step = jax.jit(lambda s, b: train_step(self.family, self.optimizer, config.ema.decay, s, b),
                             in_shardings=(self.state_shardings, self.rows), out_shardings=(self.state_shardings,
                                                                                            replicated),
                             donate_argnums=(0,))
        self._sample = jax.jit(lambda p, rng, labels: self.family.sample(p, rng, labels, config.sample),
                               in_shardings=(replicated, replicated, self.rows), out_shardings=self.rows)
        self._tokenizer = None
        self._fid = self._reference = None  # loaded at the first evaluation

    # ---- The loop's hooks. -------------------------------------------------------------------------------------------
    def init_state(self) -> GenState:
        return self._init()

    def batches(self, start_step: int):
        from vqlc_jax.data.encoded import make_encoded_pipeline

        c = self.config
        return iter(make_encoded_pipeline(
            self.dataset, global_batch_size=c.global_batch_size, seed=c.seed, train=True,
            process_index=jax.process_index(), process_count=jax.process_count(), start_step=start_step,
            fields=(*self.family.fields, "label"), use_flips=c.data.use_flips))

    def step(self, state: GenState, batch, step: int):
        arrays = {name: parallel.global_batch(getattr(batch, name), self.rows)
                  for name in (*self.family.fields, "label")}
        return self._step(state, arrays)

    def learning_rate(self, step: int) -> float:
        return float(self.schedule(step - 1))

    def evaluate(self, state: GenState, workdir: pathlib.Path, step: int, writer) -> dict[str, float]:
        """A captioned grid of decoded samples, and the generation metrics of `eval.num_samples` class-balanced
        samples (utilization and perplexity; FID, IS, precision/recall with `eval.inception_path` and a
        reference)."""
        from vqlc_jax.generators import evaluate as gen_eval

        c = self.config
        params = state.ema_params if c.sample.use_ema else state.params
        rng = jax.random.fold_in(jax.random.key(c.seed + 1), step)
        tokenizer = self.tokenizer()
        labels = grid_labels(self.family.num_classes, c.sample.grid_classes, c.sample.grid_per_class)
        samples = self.sample(params, rng, labels)
        if tokenizer is not None:  # every process decodes (one program over the mesh); process 0 writes
            images = self.family.decode(tokenizer, samples)
            if jax.process_index() == 0:
                grid = gen_eval.save_sample_grid(images, labels, c.sample.grid_per_class,
                                                 workdir / f"samples_{step:07d}.png")
                writer.write_images(step, {"samples": grid[None]})
        if tokenizer is None:
            return {}
        if self._fid is None:
            self._fid = metrics.load_fid_model(c.eval.inception_path or None)
            self._reference = gen_eval.load_reference(c.eval, self._fid, self.mesh)
        labels = class_balanced_labels(c.eval.num_samples, self.family.num_classes, seed=c.seed)
        result = gen_eval.evaluate_generated(
            self._eval_batches(params, jax.random.fold_in(rng, 1), labels, tokenizer), fid=self._fid,
            reference=self._reference[0], reference_features=self._reference[1],
            num_codes=self.dataset.codebook_sizes, resize=c.eval.resize, mesh=self.mesh)
        scalars = {f"eval/gen_{k}" if k != "num_samples" else "eval/num_samples": v
                   for k, v in result.scalars.items()}
        writer.write_scalars(step, scalars)
        return scalars

    def _eval_batches(self, params: PyTree, rng: Array, labels: np.ndarray, tokenizer):
        """(images, tokens) of this process's share of each batch of `labels` (every process samples and decodes
        the whole batch: one program over the mesh)."""
        size = self.config.eval.batch_size
        for start in range(0, len(labels), size):
            samples = self.sample(params, jax.random.fold_in(rng, start), labels[start:start + size])
            images = self.family.decode(tokenizer, samples)
            tokens = self.family.samples_to_tokens(tokenizer, samples)
            mine = np.array_split(np.arange(len(samples)), jax.process_count())[jax.process_index()]
            yield images[mine], None if tokens is None else tokens[mine]

    def exported(self, workdir: pathlib.Path) -> bool:
        return (workdir / "generator").exists()

    def export(self, state: GenState, workdir: pathlib.Path) -> None:
        from vqlc_jax.generators.generator import Generator

        Generator(self.family.config, self.dataset_info(), state.ema_params).save(workdir / "generator")

    # ---- Helpers. ----------------------------------------------------------------------------------------------------
    def dataset_info(self):
        from vqlc_jax.generators.generator import DatasetInfo

        return DatasetInfo.of(self.dataset, tokenizer_dir=self.tokenizer_dir())

    def tokenizer_dir(self) -> str:
        return self.config.tokenizer_dir or str(self.dataset.tokenizer_dir or "")

    def tokenizer(self):
        """The tokenizer that decodes samples, or None (with a warning) when its directory is missing."""
        if self._tokenizer is None:
            from vqlc_jax.tokenizer import Tokenizer

            directory = self.tokenizer_dir()
            if not directory or not pathlib.Path(directory).is_dir():
                logging.warning("tokenizer %r not found: samples are not decoded (set config.tokenizer_dir)",
                                directory)
                return None
            tokenizer = Tokenizer.load(directory)
            # Replicated over the mesh, so that it decodes inside the loop's `jax.set_mesh`.
            tokenizer.variables = jax.device_put(jax.device_get(tokenizer.variables), parallel.replicated(self.mesh))
            self._tokenizer = tokenizer
        return self._tokenizer

    def sample(self, params: PyTree, rng: Array, labels: np.ndarray) -> np.ndarray:
        """Samples for host `labels`, batch padded to the data-parallel devices; host array on every process."""
        data = self.mesh.shape[parallel.DATA]
        padded = np.resize(labels, -(-len(labels) // data) * data).astype(np.int32)
        global_labels = jax.make_array_from_callback(padded.shape, self.rows, lambda index: padded[index])
        samples = self._sample(params, rng, global_labels)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(samples, tiled=True))[: len(labels)]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       preemption: Any = None) -> dict[str, Any]:
    """Trains the generator (resuming from `workdir` when it holds checkpoints), evaluates, and exports it to
    `workdir/generator`; see `train.loop.run` for `preemption` and the result."""
    return loop.run(GeneratorTask(config), workdir, preemption=preemption)
