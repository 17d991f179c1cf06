#!/usr/bin/env bash
# Set everything up, then train the MNIST autoencoder on a farm started on 127.0.0.1:
# Redis, 2 workers and Flower. Extra arguments go to `orchestrator local` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/data-root.sh
echo "demo: data root $FARM_DATA_ROOT"
exec .venv/bin/orchestrator local --epochs 3 --workers 2 "$@"
