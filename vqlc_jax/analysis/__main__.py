"""Command line of the analysis tools; each writes `<name>.png`, `<name>.json` and `<name>.md` under its output.

    python -m vqlc_jax.analysis curve --run LC=/tmp/lc --run VQGAN=/tmp/vq --output OUT [--metric perplexity]
                                      [--per window]
    python -m vqlc_jax.analysis heatmap --counts WORKDIR/epoch_code_counts.npy --output OUT [--sort]
    python -m vqlc_jax.analysis tsne --tokenizer WORKDIR/tokenizer --counts WORKDIR/eval_code_counts.npy --output OUT
    python -m vqlc_jax.analysis replace --tokenizer WORKDIR/tokenizer --config configs/eval/demo.py --output OUT
                                        [--ranks 1,50,100,1000] [--max-images 64]
    python -m vqlc_jax.analysis sweep --config configs/sweeps/codebook_size.py[:imagenet] --workdir DIR
                                      [--set total_steps=100 ...] [--codebook-set kmeans.num_steps=50 ...]
                                      [--collect-only]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from vqlc_jax.analysis import sweeps


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


def curve_cmd(args: argparse.Namespace) -> None:
    from vqlc_jax.analysis import plots, report, usage

    curves = {label: usage.curve(usage.read_metrics(usage.metrics_path(path)), args.metric, args.per)
              for label, path in args.run}
    empty = [label for label, c in curves.items() if not c.x.size]
    if empty:
        raise SystemExit(f"no {args.per} lines with {args.metric} for {empty}: try --per window for short runs")
    scale = 100.0 if args.metric == "utilization" else 1.0
    xs = sorted({int(x) for c in curves.values() for x in c.x})
    lookups = [dict(zip(c.x.tolist(), (c.y * scale).tolist())) for c in curves.values()]
    rows = [[x, *(lookup.get(x) for lookup in lookups)] for x in xs]
    name = f"{args.metric}_per_{args.per}"
    data = {"metric": args.metric, "per": args.per,
            "runs": {label: {"path": str(path), "x": curves[label].x, "y": curves[label].y} for label, path in args.run}}
    header = f"{args.metric} (%)" if scale != 1.0 else args.metric
    report.write_report(args.output, name, data, f"## {header} per {args.per}\n\n"
                        + report.markdown_table(["epoch" if args.per == "epoch" else "step", *curves], rows))
    plots.plot_curves(curves, args.output / f"{name}.png", metric=args.metric, per=args.per)


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
    counts = usage.load_counts(args.counts, tok.num_codes)
    result = tsne.tsne_codes(tsne.projected_codebook(tok), counts, sample=args.sample, seed=args.seed,
                             perplexity=args.perplexity)
    summary = result.summary(tok.num_codes)
    data = {"tokenizer": str(args.tokenizer), "counts": str(args.counts), "seed": args.seed, **summary,
            "indices": result.indices, "points": result.points, "active": result.active}
    report.write_report(args.output, "tsne", data, "## t-SNE sample of the projected codebook\n\n"
                        + report.markdown_table(list(summary), [list(summary.values())]))
    plots.plot_tsne(result, args.output / "tsne.png")


def replace_cmd(args: argparse.Namespace) -> None:
    from vqlc_jax import Tokenizer
    from vqlc_jax.analysis import plots, replacement, report
    from vqlc_jax.analysis.sweeps import load_config_file

    config = load_config_file(args.config)
    if args.max_images is not None:
        config.data.eval_max_images = args.max_images
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vqlc_jax.analysis", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="tool", required=True)

    c = sub.add_parser("curve", help="codebook utilization (or perplexity) per epoch, one line per run (Fig. 3)")
    c.add_argument("--run", type=_labelled_run, action="append", required=True,
                   help="[LABEL=]WORKDIR or metrics.jsonl; repeat for several runs")
    c.add_argument("--metric", choices=("utilization", "perplexity"), default="utilization")
    c.add_argument("--per", choices=("epoch", "window"), default="epoch")
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

    for tool in (c, h, t, r):
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
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main(sys.argv[1:])
