#!/usr/bin/env bash
# The main job: installs what is missing, then runs PPO on the tiny CPU default (or CONFIG=...).
# Usage: scripts/train.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${RLHF_RAY_VENV:-.venv}/bin/python" -m rlhf_ray.train --config "${CONFIG:-configs/tiny_cpu.yaml}" "$@"
