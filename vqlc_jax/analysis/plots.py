"""PNG figures of the analysis data (matplotlib's object API: no pyplot state, no display needed)."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from vqlc_jax.analysis.tsne import TSNEResult
from vqlc_jax.analysis.usage import Curve

DPI = 150


def _figure(width: float, height: float) -> Figure:
    """A matplotlib Figure with constrained layout (labels never overlap)."""
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def plot_curves(curves: Mapping[str, Curve], path: str | pathlib.Path, *, metric: str, per: str,
                ceilings: Mapping[str, float] | None = None) -> pathlib.Path:
    """One line per run: `metric` (utilization in %) against epochs completed or steps (Figure 3, left); each of
    `ceilings` (label: utilization share) as a dashed horizontal line."""
    fig = _figure(5, 3.5)
    ax = fig.subplots()
    scale = 100.0 if metric == "utilization" else 1.0
    for label, c in curves.items():
        ax.plot(c.x, c.y * scale, marker="o", markersize=3, label=label)
    for i, (label, value) in enumerate((ceilings or {}).items()):
        ax.axhline(value * scale, linestyle="--", color=f"C{len(curves) + i}", label=f"{label} ({value * scale:.1f}%)")
    ax.set_xlabel("epoch" if per == "epoch" else "step")
    ax.set_ylabel("utilization (%)" if metric == "utilization" else metric)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_ceiling(cells: np.ndarray, marks: Mapping[str, int], path: str | pathlib.Path) -> pathlib.Path:
    """The feature-distribution ceiling and uniform use against tokens T (log axis), the `marks` (label: T) as
    points on the ceiling."""
    from vqlc_jax.analysis.ceiling import ceiling, uniform

    fig = _figure(5, 3.5)
    ax = fig.subplots()
    n = len(cells)
    tokens = np.geomspace(max(1.0, n / 1000), n * 1000, 200)
    ax.plot(tokens, 100 * ceiling(cells, tokens), label="feature-distribution ceiling")
    ax.plot(tokens, 100 * uniform(n, tokens), linestyle="--", label="uniform, 1 - exp(-T / N)")
    for label, t in marks.items():
        ax.plot([t], [100 * ceiling(cells, t)], marker="o", linestyle="none", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("tokens T")
    ax.set_ylabel(f"share of the {n:,} codes used (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_heatmap(grid: np.ndarray, path: str | pathlib.Path, *, title: str = "") -> pathlib.Path:
    """Per-code frequencies on a log colour scale, unused codes (0) in grey, cells past N blank (Figure 3, right)."""
    fig = _figure(5, 4.5)
    ax = fig.subplots()
    used = np.where(grid > 0, grid, np.nan)
    ax.imshow(np.where(grid == 0, 1.0, np.nan), cmap="Greys", vmin=0, vmax=2, interpolation="nearest")
    if np.any(grid > 0):
        image = ax.imshow(used, cmap="viridis", norm=LogNorm(np.nanmin(used), np.nanmax(used)),
                          interpolation="nearest")
        fig.colorbar(image, ax=ax, label="frequency (share of tokens; grey: unused)")
    ax.set_title(title)
    ax.set_axis_off()
    return _save(fig, path)


def plot_tsne(result: TSNEResult, path: str | pathlib.Path) -> pathlib.Path:
    """The sampled codes' t-SNE embedding, active and inactive codes in two colours (Figure 4); with sub-codebooks,
    one colour per sub-codebook, inactive codes as crosses."""
    fig = _figure(5, 5)
    ax = fig.subplots()
    if result.groups is None:
        layers = [(~result.active, "tab:red", "o", "inactive"), (result.active, "tab:blue", "o", "active")]
    else:
        colours = [f"C{i}" for i in range(len(result.group_names))]
        layers = [(mask & (result.groups == i), colours[i], marker, f"{name} {label}")
                  for i, name in enumerate(result.group_names)
                  for mask, marker, label in ((result.active, "o", "active"), (~result.active, "x", "inactive"))]
    for mask, colour, marker, label in layers:
        ax.scatter(result.points[mask, 0], result.points[mask, 1], s=4, c=colour, marker=marker,
                   label=f"{label} ({int(mask.sum())})")
    ax.legend(markerscale=3)
    ax.set_axis_off()
    return _save(fig, path)


def plot_replacement(rows: Sequence[Mapping[str, Any]], path: str | pathlib.Path) -> pathlib.Path:
    """PSNR and SSIM against the originals as functions of M (log axis) (Figure 5)."""
    fig = _figure(8, 3.2)
    ranks = [row["rank"] for row in rows]
    for ax, key, label in zip(fig.subplots(1, 2), ("psnr", "ssim"), ("PSNR (dB)", "SSIM")):
        ax.plot(ranks, [row[key] for row in rows], marker="o")
        ax.set_xscale("log")
        ax.set_xlabel("M (replacement by the M-th nearest code)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | pathlib.Path, *, title: str) -> pathlib.Path:
    """Bars per run of utilization (%) and PSNR; runs without results are left empty."""
    fig = _figure(max(6.0, 1.2 * len(rows)), 3.2)
    names = [row["run"] for row in rows]
    for ax, key, label, scale in zip(fig.subplots(1, 2), ("utilization", "psnr"), ("utilization (%)", "PSNR (dB)"),
                                     (100.0, 1.0)):
        ax.bar(names, [row.get(key, np.nan) * scale for row in rows])
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelrotation=45)
    fig.suptitle(title)
    return _save(fig, path)
