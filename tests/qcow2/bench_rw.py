"""Engine throughput, 4 KiB random IO on a 1 GiB fully allocated image (not a test).

    python3 tests/qcow2/bench_rw.py [DIR]
"""
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import qcow2_helpers  # noqa: E402,F401  (sets up the ublk_plugins import)
from ublk_plugins.qcow2 import Qcow2Image  # noqa: E402

N = int(os.environ.get("BENCH_OPS", "50000"))


def bench(d):
    img = os.path.join(d, "bench.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc",
                    img, "1G"], check=True)
    rnd = random.Random(0)
    offs = [rnd.randrange(1 << 18) * 4096 for _ in range(N)]
    buf = bytearray(4096)
    data = os.urandom(4096)
    res = {}
    with Qcow2Image.open(img) as q:
        for off in offs[:2000]:                       # warm the L2 cache
            q.readinto(off, buf)
        t = time.perf_counter()
        for off in offs:
            q.readinto(off, buf)
        res["read"] = time.perf_counter() - t
        # first pass: the file's preallocated (unwritten) extents get converted
        t = time.perf_counter()
        for off in offs:
            q.write(off, data)
        q.flush()
        res["write-first"] = time.perf_counter() - t
        t = time.perf_counter()
        for off in offs:
            q.write(off, data)
        q.flush()
        res["write"] = time.perf_counter() - t
        t = time.perf_counter()
        for off in offs:
            q.readinto(off, buf)
        res["read-again"] = time.perf_counter() - t
    fresh = os.path.join(d, "fresh.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", fresh, "1G"], check=True)
    n2 = min(N, 20000)
    with Qcow2Image.open(fresh) as q:
        t = time.perf_counter()
        for off in offs[:n2]:
            q.write(off, data)
        q.flush()
        res["alloc-write"] = time.perf_counter() - t
    for k, v in res.items():
        n = n2 if k == "alloc-write" else N
        print(f"4k random {k:12s}: {n / v:9.0f} IOPS  {n * 4096 / v / 2**20:7.1f} MiB/s "
              f"({n} ops, {v:.2f} s)")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        bench(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
            bench(d)
