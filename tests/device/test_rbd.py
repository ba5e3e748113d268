"""The ``rbd`` handler under the real kernel: a throw-away Ceph cluster (one monitor, one memstore
OSD) runs inside the test VM on its loopback, and ``ublk-runner run`` serves an image of it.

    tests/vm/run .venv/bin/python -m pytest -q tests/device/test_rbd.py
"""
from __future__ import annotations

import errno
import hashlib
import importlib.util
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

from .runnerproc import REPO, read_direct, sh
from .test_io import FIO_VERIFY, run_fio

pytestmark = pytest.mark.device

MiB = 1 << 20


def _cluster_module():
    name = "ublk_tests_ceph_cluster"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(REPO, "tests", "ceph", "cluster.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def cluster():
    mod = _cluster_module()
    missing = mod.missing_binaries()
    if missing:
        pytest.skip("Ceph is not installed (missing: " + ", ".join(missing) + ")")
    # the cluster listens on 127.0.0.1 only: the guest's lo must be up
    subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True)
    d = tempfile.mkdtemp(prefix="ceph-vm-", dir="/tmp")
    c = mod.Cluster(d, objectstore="memstore", store_bytes=1 << 30)
    try:
        c.up(timeout=180)
    except BaseException:
        c.down()
        raise
    try:
        yield c
    finally:
        c.down(purge=not os.environ.get("UBLK_CEPH_KEEP"))


@pytest.fixture
def image(cluster):
    names = []

    def make(size=64 * MiB):
        name = "vm-" + uuid.uuid4().hex[:8]
        cluster.create_image(name, size)
        names.append(name)
        return name
    return make


def rbd_device(cluster, image, name="r", queues=2, depth=64, **opts):
    i = cluster.info()
    extra = "".join(f"\n      {k}: {v}" for k, v in opts.items())
    return f"""
devices:
  - name: {name}
    handler: rbd
    queues: {queues}
    depth: {depth}
    options:
      pool: {i['pool']}
      image: {image}
      conf: {i['conf']}
      client: {i['client_id']}
      keyring: {i['keyring']}{extra}
"""


def rbd_cli(cluster, *args, timeout=300):
    i = cluster.info()
    return sh("rbd", "--conf", i["conf"], "--id", i["client_id"], "--keyring", i["keyring"],
              *args, timeout=timeout)


def flush_device(path):
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)  # REQ_OP_FLUSH -> the handler's flush -> librbd aio_flush
    finally:
        os.close(fd)


def test_fio_verify_2_queues_and_rbd_export(runner, cluster, image, fio, tmp_path):
    name = image(32 * MiB)
    r = runner(rbd_device(cluster, name, queues=2))
    dev = r.devices()["r"]
    assert dev["queues"] == 2 and dev["size"] == 32 * MiB
    block = dev["block"]
    sysq = f"/sys/block/{os.path.basename(block)}/queue"
    assert open(f"{sysq}/write_cache").read().strip() == "write back"
    assert open(f"{sysq}/fua").read().strip() == "1"
    assert int(open(f"{sysq}/discard_max_bytes").read()) > 0
    # 8 KiB random writes, iodepth 32, then crc32c verify (8 MiB: TCG + librbd is slow); one job
    # per CPU, each on its own 4 MiB, so both queues see IO (the queue is the submitting CPU's)
    run_fio(fio, block, "--size=4M", "--numjobs=2", "--offset_increment=4M", "--cpus_allowed=0-1",
            "--cpus_allowed_policy=split")
    through_device = read_direct(block, 0, 8 * MiB)
    flush_device(block)
    # what the runner wrote, read by another client (the runner still holds the lock)
    out = tmp_path / "export.img"
    rbd_cli(cluster, "export", f"{cluster.pool}/{name}", str(out))
    exported = out.read_bytes()
    assert len(exported) == 32 * MiB
    assert hashlib.sha256(exported[:8 * MiB]).digest() == \
        hashlib.sha256(through_device).digest()
    assert through_device != bytes(8 * MiB)
    st = r.cli_json("stats", "r")["r"]
    assert st["total"]["errors"] == 0
    assert all(q["ops"].get("write", 0) > 0 for q in st["queues"].values()), st  # both queues
    os.unlink(out)


def test_ext4_fsck_clean(runner, cluster, image, tmp_path):
    name = image(64 * MiB)
    r = runner(rbd_device(cluster, name, queues=2))
    dev = r.devices()["r"]["block"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tree = os.path.join(REPO, "runner")
    sh("mkfs.ext4", "-q", dev)  # discards the whole device first
    sh("mount", dev, str(mnt))
    try:
        shutil.copytree(tree, mnt / "tree", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    finally:
        sh("umount", str(mnt))
    assert sh("fsck.ext4", "-f", "-n", dev).returncode == 0
    sh("mount", "-o", "ro", dev, str(mnt))
    try:
        sh("diff", "-r", "-x", "*.so", "-x", "__pycache__", tree, str(mnt / "tree"))
    finally:
        sh("umount", str(mnt))
    st = r.cli_json("stats", "r")["r"]["total"]
    assert st["errors"] == 0 and st["ops"].get("write", 0) > 0 and st["ops"].get("flush", 0) > 0


def test_osd_restart_during_fio(runner, cluster, image, fio, tmp_path):
    """The only OSD goes away (clean SIGTERM, memstore keeps its data) in the middle of a fio
    verify run and comes back: IO waits, resumes, and every block verifies."""
    name = image(32 * MiB)
    # write-through, so that writes really wait for the OSD during the outage
    r = runner(rbd_device(cluster, name, queues=2, ceph_options='["rbd_cache=false"]'))
    block = r.devices()["r"]["block"]
    result = {}

    def run():
        result["p"] = subprocess.run(
            # rate-limited so the write phase (~50 s) outlasts the OSD stop even on a quiet
            # machine: a SIGTERMed memstore OSD first saves its data, which took longer than
            # the whole 8M/40 IOPS run once the native rbd path kept up with the rate
            [fio, f"--filename={block}", *FIO_VERIFY, "--size=4M", "--rate_iops=10"],
            capture_output=True, text=True, timeout=900)
    t = threading.Thread(target=run)
    t.start()
    before = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until fio is writing
        before = r.cli_json("stats", "r")["r"]["total"]["ops"]
        if before.get("write", 0) >= 64:
            break
        time.sleep(0.2)
    assert before.get("write", 0) >= 64, before
    t0 = time.monotonic()
    cluster.stop_osd()  # SIGTERM; waits until the monitor marks it down
    stopped = time.monotonic() - t0
    time.sleep(3)
    during = r.cli_json("stats", "r")["r"]["total"]
    fio_done_before_restart = not t.is_alive()
    cluster.start_osd()
    outage = time.monotonic() - t0
    t.join(900)
    p = result["p"]
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verify" not in p.stderr.lower(), p.stderr
    after = r.cli_json("stats", "r")["r"]["total"]
    assert after["errors"] == 0
    io = lambda st: st["ops"].get("write", 0) + st["ops"].get("read", 0)  # noqa: E731
    # the outage hit IO
    assert during["in_flight"] > 0 or io(after) > io(during), \
        (f"stop_osd took {stopped:.1f}s, fio done before the restart: "
         f"{fio_done_before_restart}", during, after)
    assert after["ops"].get("read", 0) > 0  # fio's verify pass ran after the outage
    print(f"outage {outage:.1f}s, in flight during it: {during['in_flight']}")


def test_io_timeout_fails_with_eio_and_the_device_keeps_answering(runner, cluster, image):
    name = image(16 * MiB)
    r = runner(rbd_device(cluster, name, queues=1, io_timeout=2))
    block = r.devices()["r"]["block"]
    fd = os.open(block, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        buf[:] = b"k" * 4096
        os.pwritev(fd, [buf], 0)
        os.fsync(fd)
        cluster.pause_osd()
        try:
            t0 = time.monotonic()
            with pytest.raises(OSError) as ei:
                os.pwritev(fd, [buf], 8192)
                os.fsync(fd)
            dt = time.monotonic() - t0
        finally:
            cluster.resume_osd()
        assert ei.value.errno == errno.EIO and dt < 30, (ei.value, dt)
        assert read_direct(block, 0, 4096) == b"k" * 4096  # the device still answers
    finally:
        os.close(fd)
    assert r.cli_json("stats", "r")["r"]["total"]["errors"] >= 1
