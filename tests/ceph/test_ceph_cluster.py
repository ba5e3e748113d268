"""The cluster script itself: CLI up/down, cleanup on failure, OSD stop/start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ublk_tests_ceph_cluster import Cluster, ClusterError, _pid_alive

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "cluster.py")


@pytest.fixture
def short_tmp():
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="ceph-t-", dir="/tmp")  # unix socket paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_cli_up_down(ceph_cluster, short_tmp):
    # ceph_cluster only for the skip-if-not-installed logic
    d = os.path.join(short_tmp, "c")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, SCRIPT, "up", d, "--image", "img", "--size", str(8 << 20)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    up = time.monotonic() - t0
    try:
        for k in ("conf", "keyring", "client", "pool"):
            assert info[k]
        assert info["client"] == "client.ublk" and info["pool"] == "rbd"
        pids = list(info["pids"].values())
        assert len(pids) == 2 and all(_pid_alive(x) for x in pids)
        q = subprocess.run(["timeout", "20", "rbd", "-c", info["conf"], "--id", info["client_id"],
                            "--keyring", info["keyring"], "info", "rbd/img"],
                           capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
        assert q.returncode == 0 and "size 8 MiB" in q.stdout, q.stderr
    finally:
        p = subprocess.run([sys.executable, SCRIPT, "down", d], capture_output=True, text=True,
                           timeout=60)
    assert p.returncode == 0, p.stderr
    assert not any(_pid_alive(x) for x in pids)
    print(f"\nCLI bring-up incl. image and interpreter start: {up:.2f}s")


def test_failed_bring_up_kills_daemons(ceph_cluster, short_tmp, monkeypatch):
    c = Cluster(short_tmp)
    started = {}

    def broken_mkfs(self=c):
        started.update(self.pids)
        raise ClusterError("injected mkfs failure")
    monkeypatch.setattr(c, "_mkfs_osd", broken_mkfs)
    with pytest.raises(ClusterError, match="injected"):
        c.up(timeout=30)
    assert "mon.a" in started
    assert not any(_pid_alive(x) for x in started.values())
    assert c.pids == {}
    # the logs of every attempt are kept for diagnosis
    assert os.path.isdir(os.path.join(short_tmp, "failed-attempt-0-log"))


def test_stop_start_osd_state(ceph_cluster):
    ceph_cluster.stop_osd()
    try:
        assert ceph_cluster.osd_state()["up"] == 0
    finally:
        ceph_cluster.start_osd()
    assert ceph_cluster.osd_state()["up"] == 1
