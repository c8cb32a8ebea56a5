#!/usr/bin/env bash
# Set up everything on a fresh machine and run the test suite:  bash scripts/test.sh [pytest args]
# PYTHON=/path/to/venv/bin/python installs into and tests with that interpreter (scripts/test_beets.sh does).
set -euo pipefail
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."

# ffmpeg decodes what libsndfile cannot (m4a/aac); mpd is the player `beet crnnradio` feeds
# (tests/test_radio.py starts its own). Without them those tests skip.
missing=()
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
command -v mpd >/dev/null 2>&1 || [ -x /usr/bin/mpd ] || missing+=(mpd)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null) \
        || echo "${missing[*]} could not be installed: the tests that need it will skip"
fi

"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test]"

export TF_CPP_MIN_LOG_LEVEL=3
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.cache/numba}"
exec "$PYTHON" -m pytest "$@"
