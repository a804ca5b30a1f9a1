"""CPU-sized FQGAN-Dual on the bundled photos (no download), beside `configs/demo.py` (VQGAN-LC, same data, sizes,
steps, learning-rate schedule and GAN): two sub-codebooks of 1,024 l2-normalised codes, disentanglement 0.1, FQGAN's
losses otherwise (`fqgan_config`: L2, quantization losses summed with weight 1, grad clip 1, Adam 0.9/0.95).

The GAN is the demo's (adaptive weight x 0.1 from step 400), not the release's fixed 0.5: the release switches it
on after 20K steps of reconstruction; after a few hundred CPU steps a fixed 0.5 overwhelms the L2 loss (measured:
L2 0.071 at step 200, 0.33 fifty steps after the GAN started at 200, validation PSNR 11.7).

    python -m vqlc_jax.main --config configs/fqgan_demo.py --workdir /tmp/fqgan_demo

No teacher weights are on this machine, so by default there is **no representation loss** (no FeatPredHead, no
teacher): the "semantic" branch is then a second visual one. Variants (comma-separated):
- `clip`: the semantic branch learns a CLIP tower's CLS feature (FeatPredHead width 1024, ViT-L/14's; set
  `--config.model.fq.feat_heads.sem.width` for another tower): `--config.loss.teachers.sem.path=FOLDER`;
- `lc`: both branches are VQGAN-LC quantizers over the demo's frozen pixel-patch codebook (`configs/codebook/demo.py`,
  1,024 x 48) with a projector each: `--config.codebook_paths.vis=CB --config.codebook_paths.sem=CB`;
- `smoke`: a few steps of a tiny model (the tests).
"""

from vqlc_jax.train.config import fqgan_config

L2VQ_1K = dict(name="l2vq", num_codes=1024, alpha=0.25, beta=1.0, entropy_weight=0.03, entropy_temperature=0.01)
LC_1K = dict(name="lc", num_codes=1024, codebook_dim=48, projector="linear", alpha=1.0, beta=0.33, chunk_size=1024)
VARIANTS = ("clip", "lc", "smoke")


def get_config(arg: str | None = None):
    variants = set(arg.split(",")) if arg else set()
    if variants - set(VARIANTS):
        raise ValueError(f"configs/fqgan_demo.py: unknown variant {arg!r} (choices, comma-separated: "
                         f"{', '.join(VARIANTS)})")
    quantizer = LC_1K if "lc" in variants else L2VQ_1K
    c = fqgan_config({"vis": quantizer, "sem": dict(quantizer)}, {"sem": ("clip", 1024)} if "clip" in variants else {})
    c.update(global_batch_size=16, total_steps=600, log_every_steps=50, checkpoint_every_steps=200,
             eval_every_steps=300)
    c.data.update(name="bundled", resolution=32)
    c.data.options = {"resolution": 32}
    c.model.ddconfig.update(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                            z_channels=32)
    c.model.fq.update(adapter_layers=2, adapter_heads=2)
    c.loss.update(allow_missing_lpips=True, disc_start=400, disc_layers=2, adaptive_weight=True, disc_weight=0.1)
    c.optimizer.update(lr=1e-3, disc_lr=1e-3, warmup_steps=50, decay="cosine")
    if "lc" in variants:
        c.codebook_paths = {"vis": "", "sem": ""}
    if "smoke" in variants:  # seconds on a CPU: a tiny model, a few steps, the GAN switched on at step 4
        c.update(global_batch_size=8, total_steps=6, log_every_steps=2, checkpoint_every_steps=3, eval_every_steps=6)
        c.data.update(resolution=16, eval_max_images=16)
        c.data.options = {"resolution": 16}
        c.model.ddconfig.update(resolution=16, ch_mult=(1, 2), attn_resolutions=(8,), z_channels=8)
        c.model.embed_dim = 4
        for branch in c.model.quantizer.branches:
            branch["quantizer"].update(num_codes=32, **({"codebook_dim": 12} if "lc" in variants else {}))
        c.model.fq.update(adapter_layers=1)
        c.loss.update(disc_start=3, disc_layers=1)
        c.optimizer.warmup_steps = 2
    return c
