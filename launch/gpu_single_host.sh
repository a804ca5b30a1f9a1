#!/usr/bin/env bash
# All GPUs of one machine in one process (JAX sees every local GPU; the batch is split over them).
#   launch/gpu_single_host.sh --config configs/vqgan_lc_imagenet_f16.py --workdir /ckpt/lc_f16
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m vqlc_jax.main "$@"
