#!/usr/bin/env bash
# Print the path of a Python X.Y that really runs: `scripts/find_python.sh 3.13`.
# A pyenv shim for a version that is not active is on PATH as python3.13 but only prints
# "command not found", so every candidate is run before it is chosen. Order: $FIND_PYTHON (an
# explicit choice: used only if it works), pythonX.Y on PATH, pyenv's X.Y.* (newest first),
# /usr/bin/pythonX.Y. Exits 2 with one sentence when none works.
set -uo pipefail
want=${1:?usage: find_python.sh X.Y}
major=${want%%.*}
minor=${want#*.}
works() {
    [ -n "$1" ] && "$1" -c "import sys, venv; sys.exit(sys.version_info[:2] != ($major, $minor))" \
        >/dev/null 2>&1
}
if [ -n "${FIND_PYTHON:-}" ]; then
    if works "$FIND_PYTHON"; then echo "$FIND_PYTHON"; exit 0; fi
    echo "$FIND_PYTHON is not a working Python $want (it does not run, or runs another version)" >&2
    exit 2
fi
for candidate in "$(command -v "python$want" || true)" \
    $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$want".*/bin/python 2>/dev/null | sort -V -r) \
    "/usr/bin/python$want"; do
    if works "$candidate"; then echo "$candidate"; exit 0; fi
done
echo "no working Python $want found (tried python$want on PATH, pyenv's $want.*, /usr/bin/python$want): install one, or name it with COLAB_PYTHON=/path/to/python$want" >&2
exit 2
