#!/usr/bin/env bash
# Sets up the environment with test dependencies and runs the test suite.
#   bash launch/tests.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
setup_venv test
cd "$REPO"
# loadgroup: the files marked xdist_group run on one worker each, so their module fixtures
# (trained runs) are built once rather than once per worker.
exec "$VENV/bin/python" -m pytest -n "${PYTEST_WORKERS:-2}" --dist=loadgroup --durations=25 "$@"
