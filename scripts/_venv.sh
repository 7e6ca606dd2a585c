# Sourced by scripts/demo and scripts/test: create .venv with python3 and install cubelm with the given extras.
# torch==2.13.0 is installed first, alone: asked for together with transformers & co. pip would pull a CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CUBELM_VENV:-$root/.venv}"
extras="${1:-}"
stamp="$venv/.cubelm-installed-$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  echo "[cubelm] setting up $venv (first run installs torch and dependencies: a few minutes)" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q "torch==2.13.0" >&2
  "$venv/bin/python" -m pip install -q -e "$root${extras:+[$extras]}" >&2
  if "$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^nvidia-' >&2; then
    echo "[cubelm] error: a CUDA torch build was pulled in; see pyproject.toml pins" >&2; exit 1
  fi
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
