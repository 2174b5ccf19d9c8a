#!/usr/bin/env bash
# Set up everything the tests need (venv, system packages, web assets) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system_deps.sh
if [ -x scripts/build_web.sh ] || [ -f scripts/build_web.sh ]; then bash scripts/build_web.sh; fi
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
