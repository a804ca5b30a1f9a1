#!/usr/bin/env bash
# The main job on the embedded default (bundled photos, no download): set up (first run only), build a codebook
# (k-means over pixel patches), train VQGAN-LC with configs/demo.py, evaluate on the held-out crops, and print
# codebook utilization, PSNR and SSIM. Writes everything under $1 (default: workdir/demo), including
# recon_*.png (originals over reconstructions) and eval/grid.png.
set -euo pipefail
cd "$(dirname "$0")"
source launch/setup_env.sh
workdir="${1:-workdir/demo}"
python -m vqlc_jax.codebook.build --config configs/codebook/demo.py --workdir "$workdir/codebook"
python -m vqlc_jax.main --config configs/demo.py --workdir "$workdir" \
  --config.codebook_path="$workdir/codebook/codebook.npy"
python -m vqlc_jax.evaluate --workdir "$workdir" --config configs/eval/demo.py --output "$workdir/eval"
echo "Reconstructions: $workdir/eval/grid.png   Report: $workdir/eval/eval.json"
