# Sourced by the launch scripts: a virtual environment with poster_cnn installed.
# PYTHON picks the interpreter (>= 3.11); VENV the environment's directory.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"

setup_venv() {  # setup_venv [extras]
  local extras="${1:-}"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || { echo "error: $PYTHON is older than Python 3.11; set PYTHON=python3.11 or newer" >&2; exit 1; }
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
  fi
  "$VENV/bin/python" -m pip install --quiet -e "$REPO${extras:+[$extras]}"
}
