#!/usr/bin/env bash
# One-shot GPU check of pkmlm (issue 25): at most 8 minutes on one CUDA GPU (the parts' time limits add up to
# 480 s), ending in one summary table.
#
#   scripts/gpu_check.sh              # on a machine with a CUDA GPU, from anywhere in the repository
#   scripts/gpu_check.sh --dry-run    # without a GPU: every part, tiny and on the CPU, to test the script itself
#
# Parts (each under its own time limit; one failing or timing out does not stop the others):
#   1. environment      torch, CUDA, the GPU, Triton
#   2. cuda tests       pytest -m cuda tests/ (memory vs CPU and brute force, Triton vs torch, 20 training
#                       steps in fp32/bf16/fp16 with resume, evaluate/generate on CUDA)
#   3. memory layer     bench/memory_layer.py --device cuda (vs the product-key-memory package if installed)
#   4. 12L_pkm          bench/train_speed.py: 100 steps in bf16, 64 x 256 tokens per step, eager and compiled
#                       (compiled only where train.compile exists): tokens/s, peak GPU memory, memory-layer s
# Logs of every part: $OUT (default runs/gpu_check/). PYTHON: the interpreter (default .venv/bin/python when
# present, else python3). Exit status: 0 when every part passed (skips included), 1 otherwise, 2 on bad usage.
set -euo pipefail

cd "$(dirname "$0")/.."
DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
  *) echo "error: unknown argument '$1': use no argument (a GPU run) or --dry-run (the CPU)" >&2; exit 2 ;;
esac
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

ROWS=()          # "part|status|seconds|detail"
STARTED=$(date +%s)

summary() {
  local total=$(( $(date +%s) - STARTED )) failed=0 row
  echo
  echo "## pkmlm GPU check ($( [[ $DRY_RUN == 1 ]] && echo 'dry run on the CPU' || echo 'CUDA' ), ${total} s, logs in $OUT)"
  echo
  echo "| part | status | s | result |"
  echo "|---|---|---:|---|"
  for row in "${ROWS[@]}"; do
    IFS='|' read -r part status seconds detail <<<"$row"
    echo "| $part | $status | $seconds | $detail |"
    [[ $status == PASS || $status == SKIP ]] || failed=1
  done
  return $failed
}
trap 'rc=$?; summary || rc=1; exit $rc' EXIT  # the table also after a failure or an early exit

# part NAME LIMIT_S DETAIL_FUNCTION COMMAND...: run COMMAND under `timeout`, log to $OUT/NAME.log, add a row.
part() {
  local name=$1 limit=$2 detail_fn=$3 rc=0 t0 status detail
  shift 3
  t0=$(date +%s)
  echo "== $name (limit ${limit} s): $*" | tee "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1 || rc=$?
  case $rc in
    0) status=PASS ;;
    124|137) status=TIMEOUT ;;
    *) status="FAIL ($rc)" ;;
  esac
  # A detail that finds nothing (a part that died early) must not end the script: `|| true`.
  detail=$("$detail_fn" "$OUT/$name.log" 2>/dev/null | tr '|\n' '/ ' | cut -c1-300) || true
  [[ -n "${detail// /}" ]] || detail=""
  ROWS+=("$name|$status|$(( $(date +%s) - t0 ))|${detail:-see $OUT/$name.log}")
  tail -n 3 "$OUT/$name.log" || true
}

skip() { ROWS+=("$1|SKIP|0|$2"); echo "== $1: skipped: $2"; }

env_detail() { grep -E '^(torch|cuda|gpu|triton)' "$1" | paste -sd';' -; }
pytest_detail() {
  local counts reasons
  counts=$(grep -E '[0-9]+ (passed|failed|skipped|deselected|error)' "$1" | tail -n 1 | sed 's/=//g')
  # "SKIPPED [N] file:line: reason" -> "N x reason", summed over locations
  reasons=$(grep -E '^SKIPPED' "$1" | sed -E 's/^SKIPPED \[([0-9]+)\] [^:]+:[0-9]+: /\1\t/' |
            awk -F'\t' '{n[$2] += $1} END {for (r in n) printf "%d x %s;", n[r], r}')
  echo "${counts:-no pytest summary}${reasons:+; skipped: $reasons}"
}
bench_detail() {
  # The first table's rows have 7 columns (9 fields split on '|'); its last row is the largest memory.
  local row package
  row=$(awk -F'|' 'NF == 9 && $2 ~ /^ [0-9,]+ $/ {last = $0} END {print last}' "$1")
  package=$(grep -q 'product-key-memory package not importable' "$1" && echo "package not installed" || echo "vs the package")
  echo "largest (slots, fwd ms, package fwd ms, ratio, step ms, package step ms, ratio): ${row:-none}; $package"
}
speed_detail() {
  awk -F'|' '/^\| configs\// {
      for (i = 2; i <= NF; i++) gsub(/^ +| +$/, "", $i)
      if ($11 ~ /skip/) printf "%s: %s; ", $3, $11
      else printf "%s: %s tok/s, %s ms/step, peak %s GiB, memory layers %s s; ", $3, $6, $7, $8, $9
  }' "$1"
}

# ---- 1. environment ------------------------------------------------------------------------------------------
part environment 60 env_detail "$PYTHON" - <<'EOF'
import importlib.util, torch
print(f"torch {torch.__version__}")
print(f"cuda {torch.version.cuda if torch.cuda.is_available() else 'not available'}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name} {p.total_memory / 2**30:.0f} GiB x {torch.cuda.device_count()}")
spec = importlib.util.find_spec("triton")
print(f"triton {__import__('triton').__version__ if spec else 'not installed'}")
EOF
HAS_CUDA=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [[ $HAS_CUDA != 1 && $DRY_RUN != 1 ]]; then
  for name in cuda-tests memory-layer 12L_pkm-bf16; do
    skip "$name" "no CUDA device visible to torch (run scripts/gpu_check.sh --dry-run to test the script on the CPU)"
  done
  exit 1
fi

# ---- 2. cuda-marked tests --------------------------------------------------------------------------------------
# Without a GPU (dry run) they all skip, each with its reason: the table then lists the reasons.
part cuda-tests 150 pytest_detail "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda -rs tests

# ---- 3. memory-layer benchmark ---------------------------------------------------------------------------------
if [[ $DRY_RUN == 1 ]]; then
  part memory-layer 120 bench_detail "$PYTHON" bench/memory_layer.py --device cpu --sizes 32 --repeats 1
else
  part memory-layer 90 bench_detail "$PYTHON" bench/memory_layer.py --device cuda --sizes 256 512 1024 --repeats 5
fi

# ---- 4. 12L_pkm training speed ---------------------------------------------------------------------------------
# 64 sequences of 256 tokens per step: the paper's per-GPU share (2048 over 32 GPUs).
if [[ $DRY_RUN == 1 ]]; then
  part tiny_pkm-cpu 240 speed_detail "$PYTHON" bench/train_speed.py configs/tiny_pkm.yaml --steps 3 --warmup 1 \
    --vocab 500 --compile both train.device=cpu data.batch_size=8
else
  part 12L_pkm-bf16 180 speed_detail "$PYTHON" bench/train_speed.py configs/12L_pkm.yaml --steps 100 --warmup 10 \
    --compile both train.device=cuda train.precision=bf16 data.batch_size=64
fi
