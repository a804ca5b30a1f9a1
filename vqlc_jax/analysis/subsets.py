"""Reconstruction from a subset of a factorized (FQGAN) tokenizer's sub-codebooks (the FQGAN paper's Figure 3).

Each image is tokenized once ([k, h, w]); it is then decoded from all k sub-codebooks, and from each one alone, the
codes of the others replaced by `fill` (`Tokenizer.decode(tokens, codebooks=(name,), fill=...)`: 'mean', the mean
of that codebook, or 'zero'). The release has no such code path; which fill it used for its figure is not said.
PSNR and SSIM are against the originals, in [0, 1], as `vqlc_jax.evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax.numpy as jnp
import numpy as np

from vqlc_jax import metrics
from vqlc_jax.evaluate import enlarge, with_caption
from vqlc_jax.tokenizer import Tokenizer


def subset_reconstructions(tok: Tokenizer, batches: Callable[[], Iterator[np.ndarray]], *, fill: str = "mean",
                           grid_images: int = 8) -> tuple[list[dict], np.ndarray]:
    """(rows, grid): one row per decoding ('all', then each sub-codebook alone) with its mean `psnr` and `ssim`
    over the images of `batches()`, and a uint8 grid of the first `grid_images` images: originals, then one
    captioned row per decoding."""
    if not tok.is_factorized:
        raise ValueError("subset_reconstructions: needs a factorized (fq) tokenizer; this one has one codebook")
    subsets = [("all", None), *((name, (name,)) for name in tok.codebook_names)]
    sums = np.zeros((len(subsets), 2), np.float64)
    shown: list[list[np.ndarray]] = [[] for _ in range(len(subsets) + 1)]
    count = 0
    for images in batches():
        tokens = tok.encode(images)
        originals = (jnp.asarray(images) + 1) / 2
        take = max(grid_images - len(shown[0]), 0)
        shown[0].extend(np.asarray(originals[:take]))
        for i, (_, codebooks) in enumerate(subsets):
            decoded = jnp.clip((tok.decode(tokens, codebooks=codebooks, fill=fill) + 1) / 2, 0, 1)
            sums[i] += [float(jnp.sum(metrics.psnr(originals, decoded))),
                        float(jnp.sum(metrics.ssim(originals, decoded)))]
            shown[i + 1].extend(np.asarray(decoded[:take]))
        count += images.shape[0]
    if not count:
        raise ValueError("subset_reconstructions: no images")
    means = sums / count
    rows = [{"codebooks": label, "psnr": float(p), "ssim": float(s)} for (label, _), (p, s) in zip(subsets, means)]
    captions = ["original"] + [f"{r['codebooks']}{' (fill: ' + fill + ')' if r['codebooks'] != 'all' else ''}: "
                               f"PSNR {r['psnr']:.2f}, SSIM {r['ssim']:.3f}" for r in rows]
    strips = [with_caption(np.concatenate(list(enlarge((np.stack(row) * 255).round().astype(np.uint8))), axis=1),
                           caption) for row, caption in zip(shown, captions)]
    return rows, np.concatenate(strips, axis=0)
