#!/usr/bin/env bash
# The main job on the embedded default (bundled photos, no download): set up (first run only), build a codebook
# (k-means over pixel patches), train VQGAN-LC with configs/demo.py, evaluate it on the held-out crops (codebook
# utilization, PSNR, SSIM); then encode the photos with it, train the demo GPT on the token maps
# (configs/gpt_demo.py) and evaluate its samples (generation utilization; FID needs Inception weights). Writes
# everything under $1 (default: workdir/demo): recon_*.png and eval/grid.png (originals over reconstructions),
# gpt/samples_*.png and gen_eval/samples.png (class-labelled samples), eval/eval.json and gen_eval/gen_eval.json.
set -euo pipefail
cd "$(dirname "$0")"
source launch/setup_env.sh
workdir="${1:-workdir/demo}"
python -m vqlc_jax.codebook.build --config configs/codebook/demo.py --workdir "$workdir/codebook"
python -m vqlc_jax.main --config configs/demo.py --workdir "$workdir" \
  --config.codebook_path="$workdir/codebook/codebook.npy"
python -m vqlc_jax.evaluate --workdir "$workdir" --config configs/eval/demo.py --output "$workdir/eval"
python -m vqlc_jax.generators.encode --tokenizer "$workdir/tokenizer" --config configs/encode/demo.py \
  --workdir "$workdir/encoded"
python -m vqlc_jax.main --config configs/gpt_demo.py --workdir "$workdir/gpt" \
  --config.data.encoded_dir="$workdir/encoded"
python -m vqlc_jax.generators.evaluate --workdir "$workdir/gpt" --config configs/eval/gen_demo.py \
  --output "$workdir/gen_eval"
echo "Reconstructions: $workdir/eval/grid.png   Samples: $workdir/gen_eval/samples.png"
echo "Reports: $workdir/eval/eval.json $workdir/gen_eval/gen_eval.json"
