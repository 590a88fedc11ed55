#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")/.."
echo "demo: not yet available" >&2
exit 1
