"""User recovery: the runner dies (SIGKILL, SIGQUIT) under load and a new runner started with the
same configuration takes its devices over: same /dev/ublkbN, no failed IO, no lost write."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from runner import ublk

from .runnerproc import REPO, read_direct, sh

pytestmark = pytest.mark.device

KILLS = int(os.environ.get("UBLK_TEST_KILLS", "20"))


def file_device(name, path, size="64M", queues=1, **opts):
    extra = "".join(f"\n    {k}: {v}" for k, v in opts.pop("device", {}).items())
    opts = "".join(f"\n      {k}: {v}" for k, v in opts.items())
    return f"""
  - name: {name}
    handler: file
    size: {size}
    queues: {queues}{extra}
    options:
      path: {path}{opts}"""


class Repeat(threading.Thread):
    """Run a command again and again until stopped; keep every failure."""

    def __init__(self, *cmd):
        super().__init__(daemon=True)
        self.cmd, self.runs, self.failures = cmd, 0, []
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            p = subprocess.run(self.cmd, capture_output=True, text=True, timeout=900)
            self.runs += 1
            if p.returncode != 0:
                self.failures.append(p.stdout[-3000:] + p.stderr[-3000:])

    def stop(self):
        self.halt.set()
        self.join(900)


def fio_verify(fio, dev, size="16M"):
    return (fio, "--name=verify", f"--filename={dev}", "--ioengine=io_uring", "--direct=1",
            "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={size}", "--verify=crc32c",
            "--do_verify=1", "--verify_fatal=1", "--verify_backlog=256", "--verify_state_save=0", "--rate_iops=300",
            "--allow_file_create=0")


def report(figures: dict) -> None:
    """Figures for the team's notes: printed, and appended to $UBLK_TEST_FIGURES if set."""
    line = json.dumps(figures)
    print(line)
    path = os.environ.get("UBLK_TEST_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def wait_state(dev_id, state, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ublk.device_info(dev_id).state == state:
            return True
        time.sleep(0.02)
    return False


def test_kill9_under_load_20_times(runner, tmp_path, fio):
    """blktests ublk/004-style: SIGKILL the runner during fio crc32c verify (file, Python and
    native paths), fio on a null device and an ext4 filesystem being written, then restart it;
    every restart must recover every device."""
    cfg = ("devices:"
           + file_device("fpy", tmp_path / "fpy.img", mode="python", queues=2)
           + file_device("fnat", tmp_path / "fnat.img", mode="native")
           + file_device("fs", tmp_path / "fs.img", size="128M", mode="native")
           + """
  - name: nul
    handler: "null"
    size: 1G""")
    r = runner(cfg)
    first = r.devices()
    blocks = {n: d["block"] for n, d in first.items()}
    ids = {n: d["id"] for n, d in first.items()}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mkfs.ext4", "-q", blocks["fs"])
    sh("mount", blocks["fs"], str(mnt))
    tree = os.path.join(REPO, "runner")
    copies = []

    def writer():
        # a file-system user that keeps writing and syncing through every crash
        n = 0
        while not stop_writer.is_set():
            dst = mnt / f"copy{n}"
            shutil.copytree(tree, dst, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
            os.sync()
            copies.append(dst)
            n += 1
            time.sleep(0.5)

    stop_writer = threading.Event()
    w = threading.Thread(target=writer, daemon=True)
    loads = [Repeat(*fio_verify(fio, blocks["fpy"])), Repeat(*fio_verify(fio, blocks["fnat"])),
             Repeat(fio, "--name=null", f"--filename={blocks['nul']}", "--ioengine=io_uring",
                    "--direct=1", "--rw=randrw", "--bs=4k", "--iodepth=32", "--size=256M",
                    "--io_size=16M", "--rate_iops=300", "--allow_file_create=0")]
    rng = random.Random(0x75626C6B)
    recoveries, kill_to_live = 0, []
    try:
        w.start()
        for t in loads:
            t.start()
        for i in range(KILLS):
            time.sleep(rng.uniform(0.3, 1.5))
            t_kill = r.kill()
            assert all(wait_state(dev_id, "QUIESCED") for dev_id in ids.values()), \
                f"kill {i}: not every device QUIESCED: {ublk.list_devices()}"
            r = runner(None)
            now = {d["name"]: d["block"] for d in r.ready["ready"]}
            assert now == blocks, f"kill {i}:\n{r.log()}"
            assert not r.ready["failed"], r.ready
            assert all(ublk.device_info(dev_id).state == "LIVE" for dev_id in ids.values())
            assert r.log().count("recovering it") == len(ids), r.log()
            recoveries += len(ids)
            kill_to_live.append(time.monotonic() - t_kill)
            print(f"kill {i}: LIVE again after {kill_to_live[-1]:.1f} s (runner ready after "
                  f"{r.ready_after:.1f} s)", file=sys.stderr, flush=True)
    finally:
        stop_writer.set()
        w.join(600)
        for t in loads:
            t.stop()
    failures = [f for t in loads for f in t.failures]
    report({"test": "kill9_under_load", "kills": KILLS, "recoveries": recoveries, "fio_runs": [t.runs for t in loads],
                      "fio_failures": len(failures), "ext4_copies": len(copies),
                      "kill_to_live_s": {"min": round(min(kill_to_live), 2),
                                         "median": round(sorted(kill_to_live)[len(kill_to_live) // 2], 2),
                                         "max": round(max(kill_to_live), 2)}})
    assert not failures, failures[0]
    assert all(t.runs > 0 for t in loads)
    sh("umount", str(mnt))
    assert sh("fsck.ext4", "-f", "-n", blocks["fs"]).returncode == 0
    sh("mount", "-o", "ro", blocks["fs"], str(mnt))
    try:
        assert copies
        for dst in copies:
            sh("diff", "-r", "-x", "*.so", "-x", "__pycache__", tree, str(dst))
    finally:
        sh("umount", str(mnt))
    st = r.cli_json("stats")
    assert all(s["total"]["errors"] == 0 for s in st.values()), st


def test_sigquit_detaches_and_a_new_runner_recovers(runner, tmp_path):
    """The upgrade path: SIGQUIT leaves the device QUIESCED, IO issued meanwhile waits and is
    served by the next runner; a recovery: none device is removed cleanly instead."""
    img = tmp_path / "d.img"
    cfg = ("devices:" + file_device("d", img, size="16M")
           + file_device("gone", tmp_path / "g.img", size="16M", device={"recovery": "none"}))
    r = runner(cfg)
    d = r.devices()["d"]
    pattern = os.urandom(4096)
    fd = os.open(d["block"], os.O_WRONLY | os.O_DIRECT)
    buf = __import__("mmap").mmap(-1, 4096)
    buf[:] = pattern
    os.pwritev(fd, [buf], 8192)
    os.close(fd)
    r.kill(signal.SIGQUIT)
    assert r.proc.returncode == 0, r.log()
    assert "detaching" in r.log()
    assert wait_state(d["id"], "QUIESCED")
    assert not any(i.ours and i.state != "QUIESCED" for i in ublk.list_devices()), ublk.list_devices()
    # a reader while no server runs: held by the kernel, answered after recovery
    reader = subprocess.Popen(["dd", f"if={d['block']}", "bs=4096", "skip=2", "count=1", "iflag=direct",
                               "status=none"], stdout=subprocess.PIPE)
    time.sleep(1)
    assert reader.poll() is None, "the kernel should hold IO while the device is QUIESCED"
    r2 = runner(None)
    assert r2.devices()["d"]["block"] == d["block"]
    out, _ = reader.communicate(timeout=120)
    assert reader.returncode == 0 and out == pattern
    assert read_direct(d["block"], 8192, 4096) == pattern


def test_backend_gone_device_deleted_after_grace(runner, tmp_path):
    """A device whose backing file vanished while the runner was dead cannot be recovered: after
    recovery_grace the device is stopped and deleted, and the IO waiting on it fails."""
    img = tmp_path / "d.img"
    r = runner("devices:" + file_device("d", img, size="16M", device={"recovery_grace": 2}))
    d = r.devices()["d"]
    r.kill()
    assert wait_state(d["id"], "QUIESCED")
    img.unlink()
    reader = subprocess.Popen(["dd", f"if={d['block']}", "of=/dev/null", "bs=4096", "count=1",
                               "iflag=direct", "status=none"], stderr=subprocess.PIPE)
    t0 = time.monotonic()
    r2 = runner(None)
    took = time.monotonic() - t0
    assert "d" in r2.ready["failed"], r2.ready
    log = r2.log()
    assert "cannot recover /dev/ublkb%d" % d["id"] in log and "recovery_grace=2" in log, log
    reader.wait(60)
    assert reader.returncode != 0
    assert d["id"] not in {i.dev_id for i in ublk.list_devices()}
    assert took < 120
    assert not os.path.exists(os.path.join(r2.state_dir, "devices.json")) or \
        "\"d\"" not in open(os.path.join(r2.state_dir, "devices.json")).read()


def test_state_entries_are_checked_not_trusted(runner, tmp_path):
    """A stale entry (its device is gone) is dropped with a warning; a device made from another
    configuration is deleted and created anew, not recovered."""
    cfg = "devices:" + file_device("e", tmp_path / "e.img", size="16M")
    r = runner(cfg)
    r.kill()
    ublk.cleanup_dead(include_quiesced=True)  # the device disappears behind the runner's back
    r = runner(None)
    assert "no longer exists" in r.log(), r.log()
    e_id = r.devices()["e"]["id"]
    r.kill()
    assert wait_state(e_id, "QUIESCED")
    r = runner("devices:" + file_device("e", tmp_path / "e.img", size="32M"))
    assert "different configuration" in r.log(), r.log()
    assert "recovering it" not in r.log()
    assert r.devices()["e"]["size"] == 32 << 20
    ours = [i for i in ublk.list_devices() if i.ours]
    assert len(ours) == 1 and ours[0].state == "LIVE", ours
