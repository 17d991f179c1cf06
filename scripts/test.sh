#!/usr/bin/env bash
# Set everything up, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/data-root.sh
echo "test: data root $FARM_DATA_ROOT"
exec .venv/bin/python -m pytest "$@"
