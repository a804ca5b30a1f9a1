"""CPU-sized classifier on the demo tokenizer's token maps of the bundled photos: which of the 8 photos a crop comes
from, judged on the held-out validation crops (no pixel shared with a train crop).

    python -m vqlc_jax.generators.encode --tokenizer W/tokenizer --config configs/encode/demo.py --workdir W/encoded
    python -m vqlc_jax.generators.encode --tokenizer W/tokenizer --config configs/encode/demo.py \
        --workdir W/encoded_val --config.data.split=validation --config.encode.flip=False
    python -m vqlc_jax.main --config configs/classify_demo.py --workdir W/classify \
        --config.data.encoded_dir=W/encoded --config.data.eval_encoded_dir=W/encoded_val

W is the workdir of `./run_demo.sh`, whose tokenizer this uses. A 4-block, 128-wide ViT over the 8x8 token maps
(64 tokens), from random weights (no MAE checkpoint at this size, so no layer decay), the rest of MAE's recipe:
AdamW, warm-up and cosine, label smoothing 0.1, drop path 0.1; the train crops and their mirror images. Token
embedding: a linear map of the tokenizer's frozen codebook rows; variant `:learned` a learned table. Variant
`:smoke` runs a few steps of a smaller model (the tests).
"""

from vqlc_jax.train import loop
from vqlc_jax.train.classifier import base_config


def get_config(arg: str | None = None):
    c = loop.add_loop_keys(base_config(), global_batch_size=64, total_steps=600, log_every_steps=50,
                           checkpoint_every_steps=300, eval_every_steps=300)
    c.classifier.update(size="Ti", depth=4, width=128, num_heads=4)
    c.optimizer.update(lr=1e-3, warmup_steps=50, min_lr=1e-5, layer_decay=1.0)
    c.eval.batch_size = 128
    variants = set(arg.split(",")) if arg else set()
    if "learned" in variants:
        c.classifier.embedding = "learned"
    if "smoke" in variants:  # seconds on a CPU
        loop.add_loop_keys(c, global_batch_size=16, total_steps=6, log_every_steps=2, checkpoint_every_steps=3,
                           eval_every_steps=6)
        c.classifier.update(depth=2, width=32, num_heads=2)
        c.optimizer.warmup_steps = 2
        c.eval.batch_size = 16
    if variants - {"learned", "smoke"}:
        raise ValueError(f"configs/classify_demo.py: unknown variant {arg!r} (choices: learned, smoke, "
                         "learned,smoke)")
    return c
