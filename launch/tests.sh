#!/usr/bin/env bash
# Sets up the environment with test dependencies and runs the test suite.
#   bash launch/tests.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
setup_venv test
cd "$REPO"
exec "$VENV/bin/python" -m pytest -n "${PYTEST_WORKERS:-2}" --durations=25 "$@"
