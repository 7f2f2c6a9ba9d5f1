"""scripts/s3_server.py as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_s3_server_script_says_in_one_line_that_a_bucket_name_is_not_one() -> None:
    """`scripts/s3_server.py --bucket b1` ended in botocore's ClientError traceback (S3 bucket
    names have 3 to 63 characters)."""
    script = Path(__file__).parent.parent / "scripts" / "s3_server.py"
    for bucket in ("b1", "-Upper_case"):
        proc = subprocess.run([sys.executable, script, f"--bucket={bucket}"], check=False, capture_output=True,
                              timeout=30)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and len(err.splitlines()) == 1 and "not an S3 bucket name" in err, err
