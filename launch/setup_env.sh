#!/usr/bin/env bash
# Source me: makes (once per requirements.txt version) and activates the virtual environment $VQLC_VENV
# (default: .venv in the project root) with requirements.txt and this package installed in editable mode.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VQLC_VENV="${VQLC_VENV:-$_root/.venv}"
_stamp="$VQLC_VENV/.requirements.sha256"
_want="$(cat "$_root/requirements.txt" "$_root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VQLC_VENV/bin/python" ] || [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  echo "[setup] creating $VQLC_VENV from requirements.txt" >&2
  python3 -m venv "$VQLC_VENV"
  "$VQLC_VENV/bin/python" -m pip install -q --upgrade pip
  "$VQLC_VENV/bin/python" -m pip install -q -r "$_root/requirements.txt"
  "$VQLC_VENV/bin/python" -m pip install -q --no-deps -e "$_root"
  echo "$_want" > "$_stamp"
fi
# shellcheck disable=SC1091
source "$VQLC_VENV/bin/activate"
