#!/usr/bin/python3
"""4 KiB random IO at a fixed queue depth through RbdBackend, on a fresh test cluster.

    /usr/bin/python3 tests/ceph/bench_backend.py [--seconds 10] [--depth 32] [--objectstore memstore]

Prints bring-up/teardown times and write/read IOPS as JSON. The client and the cluster
share the machine's cores, so treat the numbers as ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _load(name, path, pkg_dir=None):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[pkg_dir] if pkg_dir else None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class RawImage:
    """The binding without RbdBackend, to measure the wrapper's cost."""

    def __init__(self, image):
        self.image = image
        self.size = image.size()

    def aio_write(self, off, data, cb):
        self.image.aio_write(data, off, lambda c: cb(min(0, c.get_return_value()), None))

    def aio_read(self, off, n, cb):
        self.image.aio_read(off, n, lambda c, d: cb(min(0, c.get_return_value()), d))


def run(backend, depth: int, seconds: float, write: bool, bs: int = 4096) -> float:
    nblocks = backend.size // bs
    rng = random.Random(1)
    data = os.urandom(bs)
    sem = threading.Semaphore(depth)
    errors = []

    def cb(err, _data):
        if err:
            errors.append(err)
        sem.release()
    n = 0
    t0 = time.monotonic()
    end = t0 + seconds
    while True:
        sem.acquire()
        if time.monotonic() >= end:
            sem.release()
            break
        off = rng.randrange(nblocks) * bs
        if write:
            backend.aio_write(off, data, cb)
        else:
            backend.aio_read(off, bs, cb)
        n += 1
    for _ in range(depth):
        sem.acquire()
    dt = time.monotonic() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} IO errors, first errno {errors[0]}")
    return n / dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--size", type=int, default=256 << 20)
    ap.add_argument("--objectstore", default="memstore", choices=["memstore", "bluestore"])
    ap.add_argument("--no-cache", action="store_true", help="open with rbd_cache=false")
    ap.add_argument("--raw", action="store_true",
                    help="also measure the bare python3-rbd binding (no RbdBackend)")
    a = ap.parse_args()
    try:
        import ublk_plugins  # noqa: F401
    except ImportError:
        _load("ublk_plugins", os.path.join(ROOT, "plugins", "__init__.py"),
              os.path.join(ROOT, "plugins"))
    from ublk_plugins.rbd.backend import RbdBackend
    cl = _load("ublk_tests_ceph_cluster", os.path.join(HERE, "cluster.py"))
    d = tempfile.mkdtemp(prefix="ceph-bench-", dir="/tmp")
    c = cl.Cluster(d, objectstore=a.objectstore, store_bytes=max(2 << 30, 2 * a.size))
    out = {"objectstore": a.objectstore, "depth": a.depth, "bs": 4096,
           "loadavg_before": os.getloadavg()[0]}
    try:
        t = time.monotonic()
        info = c.up(image="bench", image_size=a.size)
        out["bring_up_s"] = round(time.monotonic() - t, 3)
        opts = {"rbd_cache": "false"} if a.no_cache else {}
        b = RbdBackend.open(info["pool"], "bench", conf=info["conf"], client=info["client"],
                            keyring=info["keyring"], options=opts)
        try:
            # The first pass also allocates objects (object map updates); with --raw the
            # backend is measured again after the bare binding for a fair comparison.
            out["write_iops"] = round(run(b, a.depth, a.seconds, True))
            b.sync().flush()
            out["read_iops"] = round(run(b, a.depth, a.seconds, False))
            if a.raw:
                raw = RawImage(b._image)
                for kind, target in (("raw", raw), ("backend", b)):
                    out[f"{kind}_write_iops"] = round(run(target, a.depth, a.seconds, True))
                    b.sync().flush()
                    out[f"{kind}_read_iops"] = round(run(target, a.depth, a.seconds, False))
        finally:
            b.close()
    finally:
        t = time.monotonic()
        c.down(purge=True)
        out["teardown_s"] = round(time.monotonic() - t, 3)
    out["loadavg_after"] = os.getloadavg()[0]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
