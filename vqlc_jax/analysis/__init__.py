"""Analyses of the paper's figures and ablations: codebook usage over training (Fig. 3), t-SNE of active codes
(Fig. 4), token replacement by nearer or farther codes (Fig. 5), config-driven sweeps (Tables 6, 7, 9, 10), and the
feature-distribution utilization ceiling of a codebook (`ceiling`).

Pure functions compute the data (`usage`, `tsne`, `replacement`, `sweeps`, `ceiling`), `plots` draws it, `report`
writes the JSON and Markdown, and `python -m vqlc_jax.analysis <tool>` ties them together (see `__main__`).
"""

from vqlc_jax.analysis.replacement import nearest_other_codes, rank_table, token_replacement
from vqlc_jax.analysis.sweeps import apply_overrides, collect, load_config_file, plan, run_name, run_sweep
from vqlc_jax.analysis.tsne import projected_codebook, tsne_codes
from vqlc_jax.analysis.usage import curve, frequency_grid, load_counts, read_metrics, usage_summary

__all__ = [
    "apply_overrides", "collect", "curve", "frequency_grid", "load_config_file", "load_counts", "nearest_other_codes",
    "plan", "projected_codebook", "rank_table", "read_metrics", "run_name", "run_sweep", "token_replacement",
    "tsne_codes", "usage_summary",
]
