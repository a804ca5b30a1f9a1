#!/usr/bin/env bash
# The benchmarks that matter, in one run on a lent accelerator (under 8 minutes on one GPU): generator families
# (train / sample images/s, paper sizes' parameters and FLOPs), cached GPT sampling vs the release's loop, the
# chunked cross-entropy, the tokenizer's train step and nearest-code search. Prints Markdown tables.
#   bash benchmarks/gpu.sh
# The device machine lacks ml_collections and clu: carry them as wheels in .whl/ (see the device tool's README:
# `pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl ml_collections==1.1.0 clu==0.0.12`)
# and this script installs them into /tmp/site first. TensorFlow is not needed by these benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
echo "## generators"; timeout 240 python3 benchmarks/generators.py --batch 64 --steps 10 || echo "generators: failed/timed out"
echo "## GPT sampling"; timeout 120 python3 benchmarks/gpt_sampling.py || echo "gpt_sampling: failed/timed out"
echo "## chunked cross-entropy"; timeout 90 python3 benchmarks/chunked_ce.py --codes 16384 100000 || echo "chunked_ce: failed/timed out"
echo "## tokenizer step"; timeout 60 python3 benchmarks/quantizer.py --repeats 2 || echo "quantizer: failed/timed out"
