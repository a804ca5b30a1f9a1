#!/usr/bin/env bash
# A Cloud TPU pod slice: copies nothing, runs the same command on every worker (JAX detects the pod).
#   launch/tpu_pod.sh TPU_NAME ZONE --config configs/vqgan_lc_imagenet_f16.py --workdir gs://bucket/lc_f16
# Assumes the repository is checked out at ~/vqlc_jax on every worker with launch/setup_env.sh run once.
set -euo pipefail
tpu=$1; zone=$2; shift 2
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
  --command "cd ~/vqlc_jax && source launch/setup_env.sh && python -m vqlc_jax.main $(printf '%q ' "$@")"
