#!/usr/bin/env bash
# Prepare a corpus into DATA_DIR (default: the embedded BBC News corpus into data/bbc_news).
#   scripts/prepare_data.sh                                   # BBC News -> data/bbc_news
#   scripts/prepare_data.sh --input news/ --out data/news --bpe fastbpe --vocab-size 30000
# Every argument goes to `python -m pkmlm.data.prepare` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
if [ $# -eq 0 ]; then
    set -- --corpus bbc_news --out data/bbc_news
fi
exec "$PY" -m pkmlm.data.prepare "$@"
