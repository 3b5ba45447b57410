#!/usr/bin/env bash
# Installs what is missing, then runs the test suite (unit tests + real-engine end-to-end tests).
# Usage: scripts/test.sh [--fast] [pytest args ...]
#   no --fast: the full suite (what CI runs); --fast: the fast tier only, the tests not marked e2e (-m "not e2e"),
#   a few minutes: Ray, vLLM, DeepSpeed, subprocesses and processes are refused there (tests/fast_guard.py)
set -euo pipefail
cd "$(dirname "$0")/.."
tier=()
if [[ "${1:-}" == "--fast" ]]; then
    shift
    tier=(-m "not e2e")
fi
bash scripts/install.sh
# --durations: the slowest tests in every run's summary (the suite's time budget is kept by looking at them)
exec "${RLHF_RAY_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider --durations=25 "${tier[@]}" "$@"
