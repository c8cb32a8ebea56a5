#!/usr/bin/env bash
# Install beets-crnn and run it end to end on a small generated library:  bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e .
export TF_CPP_MIN_LOG_LEVEL=3
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.cache/numba}"
exec python3 scripts/quickstart.py "$@"
