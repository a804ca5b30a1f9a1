#!/usr/bin/env bash
# Sets up the environment (first run only) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source launch/setup_env.sh
exec python -m pytest tests "$@"
