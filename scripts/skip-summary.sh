#!/usr/bin/env bash
# Prints how many tests skipped and why, from the log the tests append to (IRONCLAD_SKIP_LOG).
# Tests only skip when IRONCLAD_ALLOW_SKIP=1; otherwise a test that cannot run fails.
set -euo pipefail
log=${1:?usage: skip-summary.sh SKIP_LOG}
if [ ! -s "$log" ]; then
    echo "skipped: 0 tests"
    exit 0
fi
count=$(wc -l < "$log")
echo "skipped: $count tests (IRONCLAD_ALLOW_SKIP=1), each with what it needed:"
sed 's/^/  /' "$log"
