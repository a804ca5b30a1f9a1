"""Command line of the analysis tools; each writes `<name>.png`, `<name>.json` and `<name>.md` under its output.

    python -m vqlc_jax.analysis curve --run LC=/tmp/lc --run VQGAN=/tmp/vq --output OUT [--metric perplexity]
                                      [--per window] [--ceiling [LABEL=]0.909 ...] [--ceiling-from SWEEP.json]
    python -m vqlc_jax.analysis heatmap --counts WORKDIR/epoch_code_counts.npy --output OUT [--sort]
    python -m vqlc_jax.analysis tsne --tokenizer WORKDIR/tokenizer --counts WORKDIR/eval_code_counts.npy --output OUT
    python -m vqlc_jax.analysis subsets --tokenizer WORKDIR/tokenizer --config configs/eval/demo.py --output OUT
                                        [--fill mean|zero] [--max-images 64] [--grid-images 8]
    python -m vqlc_jax.analysis replace --tokenizer WORKDIR/tokenizer --config configs/eval/demo.py --output OUT
                                        [--ranks 1,50,100,1000] [--max-images 64]
    python -m vqlc_jax.analysis sweep --config configs/sweeps/codebook_size.py[:imagenet] --workdir DIR
                                      [--set total_steps=100 ...] [--codebook-set kmeans.num_steps=50 ...]
                                      [--collect-only]
    python -m vqlc_jax.analysis ceiling --codebook CB/codebook.npy --features CB/features --tokens 87040 19136
                                        --output OUT [--counts WORKDIR/epoch_code_counts.npy]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from vqlc_jax.analysis import ceiling, sweeps


def _labelled_run(text: str) -> tuple[str, pathlib.Path]:
    """"LABEL=PATH" or "PATH" (label: the folder's name)."""
    label, sep, path = text.partition("=")
    path = pathlib.Path(path if sep else label)
    return (label if sep else path.name), path


def _ranks(text: str) -> list[int]:
    try:
        return [int(m) for m in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _ceiling_value(text: str) -> tuple[str, float]:
    """"[LABEL=]VALUE" with VALUE a share in [0, 1] (label: "ceiling")."""
    label, sep, value = text.rpartition("=")
    try:
        share = float(value)
    except ValueError:
        share = math.nan
    if not 0 <= share <= 1:
        raise argparse.ArgumentTypeError(f"expected [LABEL=]VALUE with VALUE a share in [0, 1], got {text!r}")
    return (label if sep else "ceiling"), share


def _run_codes(path: pathlib.Path) -> int | None:
    """Codes N of a training workdir (the length of its per-code counts), None when it holds none."""
    folder = path if path.is_dir() else path.parent
    for name in ("epoch_code_counts.npy", "eval_code_counts.npy"):
        if (folder / name).is_file():
            return len(np.load(folder / name, mmap_mode="r"))
    return None


def curve_cmd(args: argparse.Namespace) -> None:
    from vqlc_jax.analysis import plots, report, usage

    curves = {label: usage.curve(usage.read_metrics(usage.metrics_path(path)), args.metric, args.per)
              for label, path in args.run}
    empty = [label for label, c in curves.items() if not c.x.size]
    if empty:
        raise SystemExit(f"no {args.per} lines with {args.metric} for {empty}: try --per window for short runs")
    ceilings = dict(args.ceiling)
    if args.ceiling_from:
        runs = {label: ((path if path.is_dir() else path.parent).name, _run_codes(path)) for label, path in args.run}
        try:
            ceilings.update(ceiling.report_ceilings(json.loads(args.ceiling_from.read_text()), runs))
        except ValueError as err:
            raise SystemExit(f"--ceiling-from {args.ceiling_from}: {err}") from None
    if ceilings and args.metric != "utilization":
        raise SystemExit("--ceiling and --ceiling-from draw utilization ceilings: use them with --metric utilization")
    scale = 100.0 if args.metric == "utilization" else 1.0
    xs = sorted({int(x) for c in curves.values() for x in c.x})
    lookups = [dict(zip(c.x.tolist(), (c.y * scale).tolist())) for c in curves.values()]
    rows = [[x, *(lookup.get(x) for lookup in lookups)] for x in xs]
    name = f"{args.metric}_per_{args.per}"
    data = {"metric": args.metric, "per": args.per,
            "runs": {label: {"path": str(path), "x": curves[label].x, "y": curves[label].y}
                     for label, path in args.run},
            "ceilings": ceilings}
    header = f"{args.metric} (%)" if scale != 1.0 else args.metric
    lines = "".join(f"\n{label}: {100 * value:.1f}%\n" for label, value in ceilings.items())
    report.write_report(args.output, name, data, f"## {header} per {args.per}\n\n"
                        + report.markdown_table(["epoch" if args.per == "epoch" else "step", *curves], rows) + lines)
    plots.plot_curves(curves, args.output / f"{name}.png", metric=args.metric, per=args.per, ceilings=ceilings)


def heatmap_cmd(args: argparse.Namespace) -> None:
    from vqlc_jax.analysis import plots, report, usage

    counts = usage.load_counts(args.counts)
    grid = usage.frequency_grid(counts, sort=args.sort)
    summary = usage.usage_summary(counts)
    data = {"counts": str(args.counts), "sorted": args.sort, "grid_shape": grid.shape,
            "cell": "a code's share of all tokens, row-major", **summary}
    report.write_report(args.output, "heatmap", data, f"## codebook usage of {args.counts}\n\n"
                        + report.markdown_table(list(summary), [list(summary.values())]))
    order = "sorted by frequency" if args.sort else "code-index order"
    plots.plot_heatmap(grid, args.output / "heatmap.png", title=f"{summary['used_codes']}/{summary['num_codes']} "
                       f"codes used ({order})")


def tsne_cmd(args: argparse.Namespace) -> None:
    from vqlc_jax import Tokenizer
    from vqlc_jax.analysis import plots, report, tsne, usage

    tok = Tokenizer.load(args.tokenizer)
    num_codes = sum(tok.codebook_sizes)
    counts = usage.load_counts(args.counts, num_codes)
    result = tsne.tsne_codes(tsne.projected_codebook(tok), counts, sample=args.sample, seed=args.seed,
                             perplexity=args.perplexity, groups=tsne.codebook_groups(tok),
                             group_names=tok.codebook_names)
    summary = result.summary(num_codes)
    data = {"tokenizer": str(args.tokenizer), "counts": str(args.counts), "seed": args.seed, **summary,
            "indices": result.indices, "points": result.points, "active": result.active}
    report.write_report(args.output, "tsne", data, "## t-SNE sample of the projected codebook\n\n"
                        + report.markdown_table(list(summary), [list(summary.values())]))
    plots.plot_tsne(result, args.output / "tsne.png")


def _eval_config(args: argparse.Namespace):
    """The evaluation config of `--config`, with `--max-images` applied."""
    from vqlc_jax.analysis.sweeps import load_config_file

    config = load_config_file(args.config)
    if args.max_images is not None:
        config.data.eval_max_images = args.max_images
    return config


def subsets_cmd(args: argparse.Namespace) -> None:
    from PIL import Image

    from vqlc_jax import Tokenizer
    from vqlc_jax.analysis import replacement, report, subsets

    config = _eval_config(args)
    tok = Tokenizer.load(args.tokenizer)
    if not tok.is_factorized:
        raise SystemExit(f"subsets: {args.tokenizer} has one codebook; the tool needs a factorized (fq) tokenizer")
    rows, grid = subsets.subset_reconstructions(tok, replacement.eval_batches(config.data, config.batch_size),
                                                fill=args.fill, grid_images=args.grid_images)
    data = {"tokenizer": str(args.tokenizer), "data": config.data.to_dict(), "fill": args.fill, "rows": rows}
    report.write_report(args.output, "subsets", data, f"## decoding from sub-codebooks (others: {args.fill})\n\n"
                        + report.markdown_table(["codebooks", "PSNR", "SSIM"],
                                                [[r["codebooks"], r["psnr"], r["ssim"]] for r in rows]))
    Image.fromarray(grid).save(args.output / "subsets.png")


def replace_cmd(args: argparse.Namespace) -> None:
    from vqlc_jax import Tokenizer
    from vqlc_jax.analysis import plots, replacement, report

    config = _eval_config(args)
    tok = Tokenizer.load(args.tokenizer)
    rows = replacement.token_replacement(tok, replacement.eval_batches(config.data, config.batch_size), args.ranks,
                                         chunk_size=args.chunk_size)
    data = {"tokenizer": str(args.tokenizer), "data": config.data.to_dict(), "M": replacement.RANK_DEFINITION,
            "rows": rows}
    headers = list(rows[0])
    report.write_report(args.output, "replacement", data, "## token replacement by the M-th nearest code\n\n"
                        + report.markdown_table(headers, [[row[h] for h in headers] for row in rows]))
    plots.plot_replacement(rows, args.output / "replacement.png")


def sweep_cmd(args: argparse.Namespace) -> None:
    from absl import logging

    from vqlc_jax.analysis import plots, report

    logging.set_verbosity(logging.INFO)
    sweep = sweeps.load_config_file(args.config)
    overrides, codebook_overrides = dict(args.set), dict(args.codebook_set)
    if args.collect_only:
        rows = sweeps.collect(sweeps.plan(sweep, overrides=overrides, codebook_overrides=codebook_overrides),
                              args.workdir)
    else:
        rows = sweeps.run_sweep(sweep, args.workdir, overrides=overrides, codebook_overrides=codebook_overrides)
    markdown = sweeps.sweep_markdown(sweep.name, rows)
    report.write_report(args.workdir, "sweep", {"sweep": sweep.to_dict(), "rows": rows}, markdown)
    plots.plot_sweep(rows, args.workdir / "sweep.png", title=sweep.name)
    print(markdown)


def ceiling_cmd(args: argparse.Namespace) -> None:
    from vqlc_jax.analysis import plots, report, usage
    from vqlc_jax.codebook import extract

    if not args.tokens and args.counts is None:
        raise SystemExit("ceiling: give --tokens T [T ...] and/or --counts COUNTS.npy")
    codebook = np.load(args.codebook)
    if codebook.ndim != 2:
        raise SystemExit(f"--codebook {args.codebook}: expected a codebook [N, D], got shape {codebook.shape}")
    features = args.features / extract.FEATURES_DIR
    features = features if (features / extract.MANIFEST_NAME).is_file() else args.features
    shards, _, _ = extract.open_features(features)
    cells = ceiling.cell_counts(codebook, shards, rows_per_block=args.rows_per_block)
    used = None if args.counts is None else usage.load_counts(args.counts, len(codebook))
    tokens = {f"T={t:,}": t for t in args.tokens}
    counted = None if used is None else f"{args.counts.name} (T={int(used.sum()):,})"
    if counted:
        tokens[counted] = int(used.sum())
    summary = ceiling.summary(cells, tokens)
    summary["duplicate_codes"] = len(codebook) - len(np.unique(codebook, axis=0))
    data = {"codebook": str(args.codebook), "features": str(features), **summary}
    rows = [[name, s["tokens"], 100 * s["ceiling"], 100 * s["uniform"], s["ceiling"] / s["uniform"]]
            for name, s in summary["splits"].items()]
    text = (f"## feature-distribution ceiling of {args.codebook}\n\n{summary['num_codes']:,} codes, "
            f"{summary['rows']:,} feature rows ({features}), {summary['nonempty_cells']:,} non-empty cells, "
            f"{summary['duplicate_codes']:,} duplicate codes\n\n"
            + report.markdown_table(["tokens", "T", "ceiling %", "uniform %", "ceiling / uniform"], rows))
    if used is not None:
        util = float(np.mean(used > 0))
        data.update(counts=str(args.counts), utilization=util,
                    util_per_ceiling=util / summary["splits"][counted]["ceiling"],
                    by_cell_size=ceiling.coverage_by_cell_size(cells, used))
        table = [[r["cell_rows"], r["codes"], 100 * r["row_share"], 100 * r["expected_hit"], 100 * r["used"]]
                 for r in data["by_cell_size"]]
        text += (f"\n{args.counts}: utilization {100 * util:.1f}%, util / ceiling {data['util_per_ceiling']:.3f}\n\n"
                 + report.markdown_table(["rows in the cell", "codes", "row share %", "ceiling's hit %", "used %"],
                                         table))
    report.write_report(args.output, "ceiling", data, text)
    np.save(args.output / ceiling.CELL_COUNTS_FILE, cells)
    plots.plot_ceiling(cells, {name: s["tokens"] for name, s in summary["splits"].items()},
                       args.output / "ceiling.png")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vqlc_jax.analysis", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="tool", required=True)

    c = sub.add_parser("curve", help="codebook utilization (or perplexity) per epoch, one line per run (Fig. 3)")
    c.add_argument("--run", type=_labelled_run, action="append", required=True,
                   help="[LABEL=]WORKDIR or metrics.jsonl; repeat for several runs")
    c.add_argument("--metric", choices=("utilization", "perplexity"), default="utilization")
    c.add_argument("--per", choices=("epoch", "window"), default="epoch")
    c.add_argument("--ceiling", type=_ceiling_value, action="append", default=[], metavar="[LABEL=]VALUE",
                   help="draw a utilization ceiling (a share in [0, 1]) as a horizontal line; repeatable")
    c.add_argument("--ceiling-from", type=pathlib.Path, metavar="SWEEP.json",
                   help="draw the training-epoch ceilings of a sweep report (utilization_sweep.json: codebooks of "
                        "the runs' N; sweep.json: rows named like the runs' folders)")
    c.set_defaults(fn=curve_cmd)

    h = sub.add_parser("heatmap", help="per-code frequency on a near-square grid, log colour (Fig. 3)")
    h.add_argument("--counts", type=pathlib.Path, required=True, help="per-code counts .npy")
    h.add_argument("--sort", action="store_true", help="order codes by decreasing frequency")
    h.set_defaults(fn=heatmap_cmd)

    t = sub.add_parser("tsne", help="t-SNE of the projected codebook, active vs inactive codes (Fig. 4)")
    t.add_argument("--tokenizer", type=pathlib.Path, required=True)
    t.add_argument("--counts", type=pathlib.Path, required=True, help="per-code counts .npy (active: count > 0)")
    t.add_argument("--sample", type=int, default=2000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--perplexity", type=float, default=30.0)
    t.set_defaults(fn=tsne_cmd)

    r = sub.add_parser("replace", help="replace tokens by their M-th nearest code; PSNR/SSIM per M (Fig. 5)")
    r.add_argument("--tokenizer", type=pathlib.Path, required=True)
    r.add_argument("--config", required=True, help="evaluation config (configs/eval/*.py[:variant]): data, batch")
    r.add_argument("--ranks", type=_ranks, default=[1, 50, 100, 1000], help="comma-separated M values")
    r.add_argument("--max-images", type=int, default=None, help="overrides data.eval_max_images")
    r.add_argument("--chunk-size", type=int, default=16384, help="codes per chunk of the neighbour search")
    r.set_defaults(fn=replace_cmd)

    u = sub.add_parser("subsets", help="a factorized tokenizer decoded from each sub-codebook alone (FQGAN Fig. 3)")
    u.add_argument("--tokenizer", type=pathlib.Path, required=True)
    u.add_argument("--config", required=True, help="evaluation config (configs/eval/*.py[:variant]): data, batch")
    u.add_argument("--fill", choices=("mean", "zero"), default="mean",
                   help="codes of the left-out sub-codebooks: their codebook's mean, or zeros")
    u.add_argument("--max-images", type=int, default=None, help="overrides data.eval_max_images")
    u.add_argument("--grid-images", type=int, default=8, help="images per row of subsets.png")
    u.set_defaults(fn=subsets_cmd)

    for tool in (c, h, t, r, u):
        tool.add_argument("--output", type=pathlib.Path, required=True, help="folder for the PNG, JSON and Markdown")

    s = sub.add_parser("sweep", help="train and evaluate a sweep config's runs, then tabulate them (Tables 6-10)")
    s.add_argument("--config", required=True, help="sweep config (configs/sweeps/*.py[:variant])")
    s.add_argument("--workdir", type=pathlib.Path, required=True, help="one folder per run, codebooks, the table")
    s.add_argument("--set", type=sweeps.parse_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="trainer config override for every run, applied last")
    s.add_argument("--codebook-set", type=sweeps.parse_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="codebook config override for every run that builds a codebook")
    s.add_argument("--collect-only", action="store_true", help="tabulate the finished runs, train nothing")
    s.set_defaults(fn=sweep_cmd)

    e = sub.add_parser("ceiling", help="feature-distribution utilization ceiling of a codebook for T tokens")
    e.add_argument("--codebook", type=pathlib.Path, required=True, help="codebook .npy [N, D]")
    e.add_argument("--features", type=pathlib.Path, required=True,
                   help="the codebook's feature shards: an extraction's features folder or its build workdir")
    e.add_argument("--tokens", type=int, nargs="+", default=[], metavar="T", help="token counts")
    e.add_argument("--counts", type=pathlib.Path, help="a tokenizer's per-code counts .npy: its utilization against "
                   "the ceiling at its token count, per cell size")
    e.add_argument("--rows-per-block", type=int, default=ceiling.DEFAULT_ROWS_PER_BLOCK,
                   help="feature rows per block of the search")
    e.add_argument("--output", type=pathlib.Path, required=True, help="folder for the PNG, JSON and Markdown")
    e.set_defaults(fn=ceiling_cmd)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main(sys.argv[1:])
