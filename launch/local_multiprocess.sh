#!/usr/bin/env bash
# Runs N local processes of the trainer that form one JAX job over loopback (used by the tests; also handy to try
# multi-host code on one machine). Each process gets DEVICES_PER_PROCESS fake CPU devices.
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS --config configs/demo.py:smoke --workdir /tmp/w
set -euo pipefail
num_processes=$1; devices=$2; shift 2
port=${VQLC_COORDINATOR_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
    python -m vqlc_jax.main --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes" \
      --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
