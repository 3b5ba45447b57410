#!/usr/bin/env bash
# Installs what is missing, then runs the test suite (unit tests + real-engine end-to-end tests).
# Usage: scripts/test.sh [pytest args ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# --durations: the slowest tests in every run's summary (the suite's time budget is kept by looking at them)
exec "${RLHF_RAY_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider --durations=25 "$@"
