"""SIGKILL a writer at random points: only leaks allowed, flushed data survives."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qcow2_helpers import CRASH_VARIANTS, ROOT, check_rc, make_variant, qemu_img, to_raw
from ublk_plugins.qcow2 import Qcow2Image

sys.path.insert(0, str(Path(__file__).parent))
from crash_workload import BLOCK, expected_after, lost_blocks  # noqa: E402

SIZE = 8 << 20
WORKLOAD = Path(__file__).parent / "crash_workload.py"


@pytest.mark.parametrize("run", range(20))
def test_sigkill(tmp_path, run):
    variant = CRASH_VARIANTS[run % len(CRASH_VARIANTS)]
    img = make_variant(tmp_path, variant, SIZE)
    initial = to_raw(img, tmp_path / "initial.raw")
    snap_before = to_raw(img, tmp_path / "snap0.raw", snapshot="s") \
        if variant == "v3-snapshot-compressed" else None
    seed = 1000 + run
    rnd = random.Random(seed)
    p = subprocess.Popen([sys.executable, str(WORKLOAD), str(ROOT / "plugins"), str(img),
                          str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()
    assert first, p.stderr.read().decode()
    time.sleep(rnd.uniform(0.0, 0.8))
    os.kill(p.pid, signal.SIGKILL)
    rest, err = p.communicate()
    lines = (first + rest).decode().split()
    last = int(lines[-1])
    assert p.returncode == -signal.SIGKILL, err.decode()

    rc, out = check_rc(img)
    assert rc in (0, 3), out                       # 3 = leaked clusters only
    print(f"{variant}: killed after generation {last}, qemu-img check rc={rc}")

    # replay: state after the last acknowledged flush, plus what the next generation
    # may have written before the kill
    nblocks = SIZE // BLOCK
    model, maybe = expected_after(initial, seed, last, [last + 1], nblocks)
    now = to_raw(img, tmp_path / "after.raw")
    with Qcow2Image.open(img, readonly=True) as q:
        gran = min(BLOCK, q.cluster_size)
    bad = lost_blocks(now, model, maybe, nblocks, gran)
    assert not bad, f"{variant}: {len(bad)} blocks lost acknowledged data, e.g. {bad[:5]}"
    if snap_before is not None:
        assert to_raw(img, tmp_path / "snap1.raw", snapshot="s") == snap_before
    # the image stays usable: repair leaks, reopen and write
    if rc == 3:
        qemu_img("check", "-r", "leaks", img)
