#!/usr/bin/env bash
# The suite on one end of the beets range setup.cfg declares, in a virtual environment of its own:
#
#   bash scripts/test_beets.sh oldest [--fast] [pytest args]   # beets == the declared minimum (beets>=X)
#   bash scripts/test_beets.sh newest [--fast] [pytest args]   # the newest beets the pin allows
#
# The venvs live in .cache/ci/beets-<end> and are reused (pip then only checks them).
# --fast runs the tests that drive beets itself (every beet command, the library, tags, write_genre,
# library training and evaluation, crash safety), not the model, front-end and export tests that
# never touch beets; slow-marked tests are left out. About 8 minutes on 2 shared cores.
set -euo pipefail
cd "$(dirname "$0")/.."

end="${1:-}"
shift || true
pin=$(sed -n 's/^ *beets *\(>=[^;#]*\).*$/\1/p' setup.cfg | head -1 | tr -d ' ')  # e.g. >=2.0,<3
minimum=$(printf '%s' "$pin" | sed -n 's/^>=\([^,]*\).*$/\1/p')
case "$end" in
    oldest) want="beets==$minimum" ;;
    newest) want="beets$pin" ;;
    *) echo "usage: bash scripts/test_beets.sh oldest|newest [--fast] [pytest args]" >&2; exit 2 ;;
esac
[ -n "$minimum" ] || { echo "setup.cfg: no beets>=X requirement found" >&2; exit 2; }

FAST=(tests/test_embed.py tests/test_similar.py tests/test_mixes.py tests/test_tags.py tests/test_library.py
      tests/test_index.py tests/test_songpath.py tests/test_m3u.py tests/test_libtrain.py tests/test_teacher.py
      tests/test_reliability.py tests/test_radio.py)
args=()
if [ "${1:-}" = "--fast" ]; then
    shift
    for f in "${FAST[@]}"; do [ -e "$f" ] && args+=("$f"); done
    args+=(-m "not slow")
fi

venv=".cache/ci/beets-$end"
if [ ! -x "$venv/bin/python" ]; then
    mkdir -p .cache/ci
    python3 -m venv "$venv" 2>/dev/null || { python3 -m pip install -q --user virtualenv && python3 -m virtualenv -q "$venv"; }
fi
# beets first, pinned (oldest) or upgraded (newest); scripts/test.sh then adds the project and [test] around it.
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$want"
echo "== beets $("$venv/bin/python" -c 'import beets; print(beets.__version__)') ($end end of $pin) in $venv =="
PYTHON="$PWD/$venv/bin/python" exec bash scripts/test.sh ${args[@]+"${args[@]}"} "$@"
