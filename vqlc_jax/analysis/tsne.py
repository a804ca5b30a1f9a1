"""t-SNE of the projected codebook, active vs inactive codes (Figure 4).

The codebook is `Quantizer.codebook_vectors()`: the effective codes in latent space [N, D'] (for `lc`, the frozen
codebook through the trained projector). A code is active when its count is > 0. A uniform sample of `sample` codes
(without replacement, numpy seeded by `seed`; all codes when N <= sample) is embedded by scikit-learn's Barnes-Hut
TSNE (PCA init, `random_state=seed`), so the same inputs give the same picture.

A factorized (FQGAN) tokenizer's sub-codebooks are embedded together (one sample over all their codes, which live in
the same D'-space): `groups` marks each code's sub-codebook, and the plot colours the points by it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vqlc_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class TSNEResult:
    """Sampled code indices [n] (ascending), their 2-D embedding [n, 2], whether each is active [n], and for
    sub-codebooks the sub-codebook of each [n] (`group_names` names them)."""

    indices: np.ndarray
    points: np.ndarray
    active: np.ndarray
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] = ()

    def summary(self, num_codes: int) -> dict[str, int]:
        out = {"num_codes": num_codes, "sampled": int(self.indices.size), "sampled_active": int(self.active.sum()),
               "sampled_inactive": int((~self.active).sum())}
        for i, name in enumerate(self.group_names):
            mask = self.groups == i
            out.update({f"sampled_{name}": int(mask.sum()), f"sampled_active_{name}": int(self.active[mask].sum())})
        return out


def projected_codebook(tok: Tokenizer) -> np.ndarray:
    """The tokenizer's effective codebook [N, D'] as float32 numpy; a factorized tokenizer's sub-codebooks one
    after the other ([sum N_i, D'], in the order of its tokens and code counts)."""
    vectors = tok.model.apply(tok.variables, method=lambda m: m.quantizer.codebook_vectors())
    return np.concatenate([np.asarray(v, np.float32) for v in vectors]) if tok.is_factorized else np.asarray(
        vectors, np.float32)


def codebook_groups(tok: Tokenizer) -> np.ndarray | None:
    """The sub-codebook index of each row of `projected_codebook(tok)`; None for a single codebook."""
    return np.repeat(np.arange(tok.num_codebooks), tok.codebook_sizes) if tok.is_factorized else None


def tsne_codes(codebook: np.ndarray, counts: np.ndarray, *, sample: int = 2000, seed: int = 0,
               perplexity: float = 30.0, groups: np.ndarray | None = None,
               group_names: tuple[str, ...] = ()) -> TSNEResult:
    """Embeds a seeded sample of the codebook [N, D] in 2-D; `counts` [N] mark the active codes, `groups` [N]
    (optional, with `group_names`) the sub-codebook of each code.

    The perplexity is capped at (n - 1) / 3 for small samples (TSNE needs perplexity < n).
    """
    from sklearn.manifold import TSNE

    codebook, counts = np.asarray(codebook, np.float32), np.asarray(counts)
    if codebook.ndim != 2 or counts.shape != codebook.shape[:1]:
        raise ValueError(f"tsne_codes: codebook {codebook.shape} and counts {counts.shape} must be [N, D] and [N]")
    num_codes = codebook.shape[0]
    n = min(sample, num_codes)
    if n < 4:
        raise ValueError(f"tsne_codes: needs at least 4 codes, got sample={sample} of {num_codes}")
    indices = np.sort(np.random.default_rng(seed).choice(num_codes, n, replace=False))
    tsne = TSNE(2, perplexity=min(perplexity, (n - 1) / 3), init="pca", random_state=seed)
    points = tsne.fit_transform(codebook[indices]).astype(np.float32)
    picked = None if groups is None else np.asarray(groups)[indices]
    return TSNEResult(indices, points, counts[indices] > 0, picked, tuple(group_names))
