#!/usr/bin/env bash
# Source me: makes (once per requirements.txt version) and activates the virtual environment $VQLC_VENV
# (default: .venv in the project root) with requirements.txt and this package installed in editable mode.
# On accelerators set VQLC_ACCELERATOR=cuda12 or tpu: jax is then installed with that backend.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VQLC_VENV="${VQLC_VENV:-$_root/.venv}"
_stamp="$VQLC_VENV/.requirements.sha256"
_accel="${VQLC_ACCELERATOR:-cpu}"
_want="$( (cat "$_root/requirements.txt" "$_root/pyproject.toml"; echo "$_accel") | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VQLC_VENV/bin/python" ] || [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  echo "[setup] creating $VQLC_VENV from requirements.txt" >&2
  python3 -m venv "$VQLC_VENV"
  "$VQLC_VENV/bin/python" -m pip install -q --upgrade pip
  "$VQLC_VENV/bin/python" -m pip install -q -r "$_root/requirements.txt"
  if [ "$_accel" != cpu ]; then
    _jax="$(grep -E '^jax\[' "$_root/requirements.txt" | sed -E 's/^jax\[[a-z0-9]+\]/jax['"$_accel"']/')"
    "$VQLC_VENV/bin/python" -m pip install -q "$_jax"
  fi
  "$VQLC_VENV/bin/python" -m pip install -q --no-deps -e "$_root"
  echo "$_want" > "$_stamp"
fi
# shellcheck disable=SC1091
source "$VQLC_VENV/bin/activate"
