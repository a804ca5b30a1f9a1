"""CPU-sized class-conditional GPT on the demo tokenizer's token maps of the bundled photos (8 classes: the source
photo), a few minutes on 2 cores; writes sample grids (`samples_*.png`) and the exported `generator/`.

    python -m vqlc_jax.generators.encode --tokenizer W/tokenizer --config configs/encode/demo.py --workdir W/encoded
    python -m vqlc_jax.main --config configs/gpt_demo.py --workdir W/gpt --config.data.encoded_dir=W/encoded

W is the workdir of `./run_demo.sh`, whose tokenizer this uses (about 6 minutes more on this 2-core CPU, so not
part of it). The release's minGPT (learned positions, one table for codes and class ids, pkeep 0.8) at 4 layers x
256, with the null class and 10% label dropout so that guidance can be tried at sampling
(`--config.sample.cfg_scale=2`). Variant `:smoke` runs a few steps (used by the tests).
"""

from vqlc_jax.generators.config import base_config


def get_config(arg: str | None = None):
    c = base_config("gpt")
    c.global_batch_size = 32
    c.total_steps = 600
    c.log_every_steps = 50
    c.checkpoint_every_steps = 200
    c.eval_every_steps = 300
    c.data.use_flips = True
    c.model.update(num_layers=4, num_heads=8, width=256, null_class=True)
    c.loss.update(class_dropout=0.1, chunk_size=512)
    c.optimizer.update(lr=1e-3, warmup_steps=50, decay="cosine", weight_decay=0.05)
    c.ema.decay = 0.99
    c.sample.update(grid_classes=8, grid_per_class=8)
    c.eval.num_samples = 256
    if arg == "smoke":  # seconds on a CPU
        c.global_batch_size = 8
        c.total_steps = 6
        c.log_every_steps = 2
        c.checkpoint_every_steps = 3
        c.eval_every_steps = 6
        c.model.update(num_layers=2, num_heads=2, width=32)
        c.loss.chunk_size = 100
        c.sample.update(grid_classes=2, grid_per_class=4)
        c.eval.num_samples = 16
        c.optimizer.warmup_steps = 2
    elif arg:
        raise ValueError(f"configs/gpt_demo.py: unknown variant {arg!r} (choices: smoke)")
    return c
