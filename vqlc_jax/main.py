"""Train a tokenizer, a generator or a classifier from an ml_collections config file (a config with a `generator`
key trains the generator family it names on an encoded dataset, one with a `classifier` section a classifier on
token maps; any other trains a tokenizer).

    python -m vqlc_jax.main --config configs/demo.py --workdir /tmp/vqlc_demo [--config.total_steps=100]
    python -m vqlc_jax.main --config configs/gpt_demo.py --workdir /tmp/gpt_demo --config.data.encoded_dir=...
    python -m vqlc_jax.main --config configs/classify_demo.py --workdir /tmp/cls_demo --config.data.encoded_dir=...

Multi-host: JAX detects TPU pods and SLURM; otherwise pass --coordinator_address, --num_processes, --process_id.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from vqlc_jax import parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the exported model.")
_START_DISTRIBUTED = parallel.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
    """absl log filter: drops INFO chatter from orbax (one line per file written)."""

    def filter(self, record) -> bool:
        return record.levelno > 20 or "/orbax/" not in record.pathname


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    _START_DISTRIBUTED()
    if "generator" in _CONFIG.value:
        from vqlc_jax.train.generator import train_and_evaluate
    elif "classifier" in _CONFIG.value:
        from vqlc_jax.train.classifier import train_and_evaluate
    else:
        from vqlc_jax.train.trainer import train_and_evaluate

    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info("Finished: %s", result)


if __name__ == "__main__":
    app.run(main)
