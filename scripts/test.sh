#!/usr/bin/env bash
# Run the whole test suite on this machine, installing whatever is missing first.
#   scripts/test.sh                 everything
#   scripts/test.sh -k restore -x   any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

set +e
python -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit $rc
