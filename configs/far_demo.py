"""CPU-sized FAR on the demo tokenizer's encoded bundled photos (8 classes: the source photo); the number of
sub-codebooks and their sizes are read off the encoded dataset (1 for the demo VQGAN-LC tokenizer, 2 for an
FQGAN-Dual one), so the same file trains on either.

    python -m vqlc_jax.generators.encode --tokenizer W/tokenizer --config configs/encode/demo.py --workdir W/encoded
    python -m vqlc_jax.main --config configs/far_demo.py --workdir W/far --config.data.encoded_dir=W/encoded

W is the workdir of `./run_demo.sh`. 4 layers x 256, 8 heads, head 2 layers, 400 steps at batch 32, 10% label
dropout, guidance 2.0 at sampling. Variant `:smoke` runs a few steps of a smaller model (the tests).
"""

from vqlc_jax.generators.config import base_config


def get_config(arg: str | None = None):
    c = base_config("far")
    c.update(global_batch_size=32, total_steps=400, log_every_steps=50, checkpoint_every_steps=200,
             eval_every_steps=200)
    c.model.update(num_layers=4, num_heads=8, width=256, head_layers=2, dropout=0.0)
    c.loss.chunk_size = 512
    c.optimizer.update(lr=1e-3, warmup_steps=50, decay="cosine")
    c.ema.decay = 0.99
    c.eval.num_samples = 256
    if arg == "smoke":  # seconds on a CPU
        c.update(global_batch_size=8, total_steps=4, log_every_steps=2, checkpoint_every_steps=2, eval_every_steps=4)
        c.model.update(num_layers=2, num_heads=2, width=32, head_layers=1)
        c.loss.chunk_size = 32
        c.optimizer.warmup_steps = 1
        c.sample.update(grid_classes=2, grid_per_class=2)
        c.eval.num_samples = 8
    elif arg:
        raise ValueError(f"configs/far_demo.py: unknown variant {arg!r} (choices: smoke)")
    return c
