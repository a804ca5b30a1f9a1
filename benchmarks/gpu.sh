#!/usr/bin/env bash
# The benchmarks that matter, in one run on a lent accelerator (under 6 minutes on one GPU): the tokenizer's train
# step against the release's (f16 at 256 px, N = 100,000, timed side by side), generator families (train / sample
# images/s, paper sizes' parameters and FLOPs), cached GPT sampling vs the release's loop, the chunked
# cross-entropy and the nearest-code search. Prints Markdown tables.
#   bash benchmarks/gpu.sh                          # all of them
#   ONLY="train_step gpt_sampling" bash benchmarks/gpu.sh   # a subset (names: the benchmarks/ scripts)
# The device machine lacks ml_collections and clu: carry them as wheels in .whl/ (see the device tool's README:
# `pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl ml_collections==1.1.0 clu==0.0.12`)
# and this script installs them into /tmp/site first. For the side-by-side step, carry the release's
# `vqgan-gpt-lc` folder and `bench_official_step.py` in .release/ (skipped when absent). No TensorFlow needed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
ONLY=${ONLY:-train_step generators gpt_sampling chunked_ce quantizer}
want() { [[ " $ONLY " == *" $1 "* ]]; }
if want train_step && [ -f .release/vqgan-gpt-lc/models/models_vq.py ]; then
  echo "## tokenizer train step, side by side with the release (JAX takes at most 40% of the GPU, torch the rest)"
  XLA_PYTHON_CLIENT_PREALLOCATE=true XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 timeout 150 python3 benchmarks/train_step.py --model f16 --codes 100000 --rounds 3 --steps 5 \
    --official .release/vqgan-gpt-lc --official-script .release/bench_official_step.py --torch-python python3 \
    || echo "train_step: failed/timed out"
fi
want generators && { echo "## generators"; timeout 130 python3 benchmarks/generators.py --batch 64 --steps 10 || echo "generators: failed/timed out"; }
want gpt_sampling && { echo "## GPT sampling"; timeout 80 python3 benchmarks/gpt_sampling.py || echo "gpt_sampling: failed/timed out"; }
want chunked_ce && { echo "## chunked cross-entropy"; timeout 40 python3 benchmarks/chunked_ce.py --codes 16384 100000 || echo "chunked_ce: failed/timed out"; }
want quantizer && { echo "## nearest-code search"; timeout 40 python3 benchmarks/quantizer.py --repeats 2 || echo "quantizer: failed/timed out"; }
