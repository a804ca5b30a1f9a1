"""Mini-batch k-means: vqlc_jax vs scikit-learn's MiniBatchKMeans on the same data and the same number of steps.

Data: n points in D dims from a mixture of `--components` Gaussians (means N(0, 3^2), unit variance). Both run
`epochs x n // batch` steps (scikit-learn's count for max_iter=epochs) with the same init method on its own random
stream, scikit-learn with tol=0 and max_no_improvement=None (no early stop) and compute_labels=False. Reported per k:
wall time of each fit (ours includes jit compilation and init), inertia of each on the full data (one function for
both, cross-checked against scikit-learn's score), their ratio, and throughput in points x centres per second.

    nice -n 10 python benchmarks/kmeans.py                 # n=200,000, D=64, k in {1024, 4096}, batch 4096, 100 epochs
    python benchmarks/kmeans.py --quick                    # smoke run, seconds
    python benchmarks/kmeans.py --k 1024 --epochs 20 --dim 768
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np


def mixture(n: int, dim: int, components: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = 3.0 * rng.standard_normal((components, dim))
    return (means[rng.integers(0, components, n)] + rng.standard_normal((n, dim))).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--components", type=int, default=2000)
    parser.add_argument("--k", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=100, help="steps = epochs * n // batch (4,882 by default)")
    parser.add_argument("--init", default="kmeans++", choices=["kmeans++", "random"])
    parser.add_argument("--dot-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--sklearn-threads", type=int, help="OpenMP threads of scikit-learn (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="n=20,000, D=32, k=256, batch 1024, 20 epochs")
    parser.add_argument("--verbose", action="store_true", help="log our mini-batch inertia")
    args = parser.parse_args()
    if args.quick:
        args.n, args.dim, args.components, args.k, args.batch_size, args.epochs = 20_000, 32, 500, [256], 1024, 20
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    import jax
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    from vqlc_jax.codebook.kmeans import inertia, minibatch_kmeans

    data = mixture(args.n, args.dim, args.components, args.seed)
    steps = args.epochs * args.n // args.batch_size
    print(f"n={args.n} D={args.dim} components={args.components} batch={args.batch_size} steps={steps} "
          f"init={args.init} dot={args.dot_dtype}; jax {jax.__version__} on {jax.devices()[0].platform} x1")
    rows = []
    for k in args.k:
        start = time.perf_counter()
        ours = minibatch_kmeans(data, k, batch_size=args.batch_size, num_steps=steps, seed=args.seed, init=args.init,
                                dot_dtype=args.dot_dtype, num_devices=1, log_every=max(steps // 10, 1))
        rows.append(("vqlc_jax", k, time.perf_counter() - start, inertia(data, ours, num_devices=1)))
        if not args.skip_sklearn:
            model = MiniBatchKMeans(k, init="k-means++" if args.init == "kmeans++" else "random", n_init=1,
                                    batch_size=args.batch_size, max_iter=args.epochs, tol=0.0,
                                    max_no_improvement=None, compute_labels=False, random_state=args.seed)
            start = time.perf_counter()
            with threadpool_limits(args.sklearn_threads, "openmp"):
                model.fit(data)
            wall = time.perf_counter() - start
            value = inertia(data, model.cluster_centers_, num_devices=1)
            assert abs(value + model.score(data)) <= 1e-4 * value, (value, -model.score(data))
            assert model.n_steps_ == steps, (model.n_steps_, steps)
            rows.append(("scikit-learn", k, wall, value))

    print("\n| method | k | steps | wall s | inertia (full data) | vs scikit-learn | points x centres / s |")
    print("|---|---|---|---|---|---|---|")
    reference = {k: value for name, k, _, value in rows if name == "scikit-learn"}
    for name, k, wall, value in rows:
        ratio = f"{value / reference[k]:.4f}" if k in reference else "-"
        print(f"| {name} | {k} | {steps} | {wall:.1f} | {value:.6g} | {ratio} | "
              f"{steps * args.batch_size * k / wall:.3g} |")


if __name__ == "__main__":
    main()
