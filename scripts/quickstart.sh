#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job on its defaults: the benchmark of the
# reference BagNet against the fast one (and ResNet-50), written to a new folder
# bench-out/<date-time>/ (bench never overwrites earlier results). Extra arguments go to bench.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m bagnet_fast bench --out "bench-out/$(date +%Y%m%d-%H%M%S)" "$@"
