"""Generation evaluation of the demo GPT (`configs/gpt_demo.py`): 32 samples per class of the 8 bundled photos.

    python -m vqlc_jax.generators.evaluate --workdir /tmp/vqlc_demo/gpt --config configs/eval/gen_demo.py

Generation utilization and perplexity are always computed; FID, Inception Score and precision/recall need
pytorch-fid's Inception weights (`--config.inception_path=...`) and are reported unavailable (with the reason)
otherwise. The FID reference is the bundled validation split, with clean-fid's resize. Sampling options of the
trained config can be overridden: `--config.sample.cfg_scale=2.0`, `--config.sample.top_k=100`.
"""

from vqlc_jax.generators.eval_config import base_config


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/eval/gen_demo.py: unknown variant {arg!r} (it has none)")
    c = base_config()
    c.samples_per_class = 32
    c.batch_size = 64
    c.reference_data.update(name="bundled", split="validation", options={"resolution": 32}, resolution=32)
    return c
