#!/usr/bin/env bash
# Install fastBPE (the original release's BPE tool) into the venv: the Python module that applies
# codes, and the `fast` binary that learns them ($VENV/bin/fast).
# fastBPE 0.1.0 ships only an sdist that needs cython at build time; on Python >= 3.11 it builds only
# without build isolation. Its sdist also carries fastBPE/main.cc, the source of `fast`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
CXX=${CXX:-g++}
if "$PY" -c "import fastBPE" 2>/dev/null && [ -x "$VENV/bin/fast" ]; then
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip install -q cython
"$PY" -m pip download -q --no-deps --no-binary :all: "fastBPE==0.1.0" -d "$work"
"$PY" -m pip install -q --no-build-isolation "$work"/fastBPE-0.1.0.tar.gz
tar -xzf "$work"/fastBPE-0.1.0.tar.gz -C "$work"
"$CXX" -O3 -pthread -std=c++11 "$work"/fastBPE-0.1.0/fastBPE/main.cc -o "$work/fast"
mv "$work/fast" "$VENV/bin/fast"
echo "fastBPE installed: $VENV/bin/fast and the fastBPE Python module"
