#!/usr/bin/env bash
# `make demo`: prepare the BBC News corpus (once), train configs/tiny_pkm.yaml on the CPU for a few minutes,
# print its validation perplexity and memory usage, then the evaluate.py table (perplexity per split, memory
# usage, KL, Gini). Runs after `make setup`. Rerunning continues the same
# run (--resume) and reports on it; extra arguments are config overrides, e.g. train.max_steps=600.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
DATA=data/bbc_news

# Prepared once; again when this version cannot read it (e.g. format 1, before line breaks were kept).
if ! "$PY" -c "import sys; from pkmlm.data.bpe import load_tokenizer; from pkmlm.data.shards import open_split
load_tokenizer(sys.argv[1] + '/tokenizer'); open_split(sys.argv[1] + '/valid')" "$DATA" 2>/dev/null; then
    echo "== preparing $DATA (Moses tokenization + sentencepiece BPE; once)"
    "$PY" -m pkmlm.data.prepare --corpus bbc_news --out "$DATA"
fi

echo "== training configs/tiny_pkm.yaml on the CPU (TensorBoard: tensorboard --logdir runs/tiny_pkm)"
"$PY" train.py --config configs/tiny_pkm.yaml data.dir="$DATA" train.device=cpu "$@" --resume

echo "== evaluating runs/tiny_pkm on the validation and test splits"
"$PY" evaluate.py runs/tiny_pkm --split valid,test
