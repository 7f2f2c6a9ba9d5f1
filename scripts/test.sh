#!/usr/bin/env bash
# Run the whole test suite on this machine, installing whatever is missing first.
#   scripts/test.sh                 everything
#   scripts/test.sh -k restore -x   any pytest arguments
#   scripts/test.sh -n 0 ...        in one process (to debug: -s, --pdb); -n N for N workers
# The tests run in parallel (pytest-xdist): most of them wait on FUSE daemons, subprocesses and the
# S3 server, so `-n auto` means one worker more than this machine has cores (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

parallel=(-n auto --dist worksteal)
for arg in "$@"; do
    case $arg in no:xdist | -pno:xdist) parallel=() ;; esac  # `-p no:xdist` would not know -n
done

set +e
python -m pytest "${parallel[@]}" "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit $rc
