"""SIGKILL a writer at random points: only leaks allowed, flushed data survives."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qcow2_helpers import ROOT, check_rc, qemu_img, qemu_io, to_raw
from ublk_plugins.qcow2 import Qcow2Image

sys.path.insert(0, str(Path(__file__).parent))
from crash_workload import BLOCK, block_content, lost_blocks, ops_for_generation  # noqa: E402,E501

SIZE = 8 << 20
WORKLOAD = Path(__file__).parent / "crash_workload.py"


def make(tmp, variant):
    img = tmp / "c.qcow2"
    if variant == "fresh-v3-64k":
        qemu_img("create", "-f", "qcow2", img, SIZE)
    elif variant == "v2-4k-raw-backing":
        base = tmp / "base.raw"
        base.write_bytes(bytes(range(13, 256, 2)) * (SIZE // 122) + bytes(SIZE % 122))
        qemu_img("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096",
                 "-b", "base.raw", "-F", "raw", img, SIZE)
    elif variant == "v3-snapshot-compressed":
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16384", img, SIZE)
        qemu_io(img, "write -c -P 0x44 0 1M", "write -P 0x55 1M 2M", "write -z 3M 1M")
        qemu_img("snapshot", "-c", "s", img)
    elif variant == "v3-512-refcount64":
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", img, SIZE)
    return img


VARIANTS = ["fresh-v3-64k", "v2-4k-raw-backing", "v3-snapshot-compressed", "v3-512-refcount64"]


@pytest.mark.parametrize("run", range(20))
def test_sigkill(tmp_path, run):
    variant = VARIANTS[run % len(VARIANTS)]
    img = make(tmp_path, variant)
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
    model = [initial[b * BLOCK:(b + 1) * BLOCK] for b in range(nblocks)]
    for gen in range(last + 1):
        for kind, b, n, i in ops_for_generation(seed, gen, nblocks):
            for k in range(n):
                model[b + k] = block_content(seed, gen, i, b + k) if kind == "write" \
                    else bytes(BLOCK)
    maybe = {}
    for kind, b, n, i in ops_for_generation(seed, last + 1, nblocks):
        for k in range(n):
            maybe.setdefault(b + k, []).append(
                block_content(seed, last + 1, i, b + k) if kind == "write" else bytes(BLOCK))
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
