"""The command line on a machine without ublk: errors are one clear line, nothing else."""

import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(os.path.exists("/dev/ublk-control"), reason="this kernel has ublk")
def test_features_without_ublk_is_one_clear_error():
    p = subprocess.run([sys.executable, "-m", "runner.cli", "features", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stdout == ""
    # one line naming the device node and the fix; no traceback from a half-made object
    assert p.stderr.count("\n") == 1, p.stderr
    assert "open /dev/ublk-control" in p.stderr and "modprobe ublk_drv" in p.stderr
    assert "Exception ignored" not in p.stderr
