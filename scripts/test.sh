#!/usr/bin/env bash
# The test command: set everything up (scripts/setup.sh), then run the whole suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k manifest -x).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
