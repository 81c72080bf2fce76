#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job on its defaults: the benchmark of the
# reference BagNet against the fast one (and ResNet-50), written to bench-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m bagnet_fast bench "$@"
