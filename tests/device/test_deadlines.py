"""Bounded waits: a request the handler never finishes is failed at the device's deadline while
the device goes on serving; deleting, stopping and killing under load all end in bounded time
with no process stuck in D state."""
import errno
import glob
import re
import signal
import subprocess
import threading
import time

import pytest

from runner import ublk

from .runnerproc import read_direct

pytestmark = pytest.mark.device

PLUGIN = ("--plugin", "tests.device.faulty_plugin")


def d_state_processes() -> list[str]:
    """Processes in uninterruptible sleep (D): what a hung block device leaves behind."""
    stuck = []
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(path) as f:
                stat = f.read()
        except OSError:
            continue
        comm_end = stat.rindex(")")
        if stat[comm_end + 2] == "D":
            stuck.append(stat[:comm_end + 1])
    return stuck


def no_d_state(timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stuck = d_state_processes()
        if not stuck:
            return []
        time.sleep(0.5)
    return stuck


@pytest.mark.parametrize("handler,style", [("hanging", "future"), ("hanging-async", None)])
def test_a_request_past_its_deadline_fails_and_the_device_keeps_serving(runner, handler, style):
    opts = "{hang_offset: 1048576" + (f", style: {style}" if style else "") + "}"
    r = runner(f"""
devices:
  - name: slow
    handler: {handler}
    size: 16M
    request_timeout: 2
    options: {opts}
""", extra_args=PLUGIN)
    dev = r.devices()["slow"]["block"]
    outcome = {}

    def hanging_read():
        t0 = time.monotonic()
        try:
            read_direct(dev, 1 << 20, 4096)
            outcome["error"] = None
        except OSError as e:
            outcome["error"] = e.errno
        outcome["took"] = time.monotonic() - t0

    t = threading.Thread(target=hanging_read)
    t.start()
    time.sleep(0.5)
    # while that request hangs, the same device serves others
    assert read_direct(dev, 0, 4096) == bytes(4096)
    t.join(120)
    assert not t.is_alive(), "the hanging read was never failed"
    assert outcome["error"] in (errno.ETIMEDOUT, errno.EIO), outcome
    assert outcome["took"] >= 1.5, outcome
    assert read_direct(dev, 8192, 4096) == bytes(4096)
    st = r.cli_json("stats", "slow")["slow"]["total"]
    assert st["timed_out"] == 1, st
    log = r.log()
    assert f"handler '{handler}' did not finish read of 4096 bytes at offset 1048576" in log, log
    assert "request_timeout=2 s" in log


def stop_seconds(log: str, name: str) -> float:
    """How long the runner itself took to stop and delete a device (its log line)."""
    m = re.search(rf"device {name}: stopped and deleted in ([0-9.]+) s", log)
    assert m, log
    return float(m.group(1))


def disk_ios(dev) -> int:
    with open(f"/sys/block/{dev.rsplit('/', 1)[1]}/stat") as f:
        fields = f.read().split()
    return int(fields[0]) + int(fields[4])


def fio_load(fio, dev, runtime=300):
    """fio on ``dev`` in the background, returned once its IO reaches the disk (fio starts
    slowly under TCG, and a fio that opens the path after the disk is gone would create a file)."""
    before = disk_ios(dev)
    p = subprocess.Popen(
        [fio, "--name=load", f"--filename={dev}", "--ioengine=io_uring", "--direct=1", "--rw=randrw",
         "--bs=4k", "--iodepth=32", "--rate_iops=400", "--time_based", f"--runtime={runtime}",
         "--size=32M", "--allow_file_create=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while disk_ios(dev) < before + 200:
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0] if p.poll() else "fio slow"
        time.sleep(0.2)
    return p


def file_cfg(tmp_path, recovery="auto"):
    return f"""
devices:
  - name: d
    handler: file
    size: 32M
    recovery: {recovery}
    options: {{path: {tmp_path / 'd.img'}}}
  - name: other
    handler: "null"
    size: 16M
"""


def test_delete_under_load_is_bounded(runner, tmp_path, fio):
    r = runner(file_cfg(tmp_path))
    dev = r.devices()["d"]
    load = fio_load(fio, dev["block"])
    r.cli("del", "d", timeout=300)
    load.wait(120)   # fio sees errors and ends, it does not hang
    # the kernel waits for fio to close the disk before it frees the id: DEL_DEV_ASYNC, not us
    assert stop_seconds(r.log(), "d") < 45
    assert dev["id"] not in {i.dev_id for i in ublk.list_devices()}
    assert no_d_state() == []
    assert len(read_direct(r.devices()["other"]["block"], 0, 4096)) == 4096


def test_stop_under_load_is_bounded(runner, tmp_path, fio):
    r = runner(file_cfg(tmp_path))
    load = fio_load(fio, r.devices()["d"]["block"])
    assert r.stop(timeout=300) == 0
    assert stop_seconds(r.log(), "d") < 45
    load.wait(120)
    assert not [i for i in ublk.list_devices() if i.ours]
    assert no_d_state() == []


def test_sigkill_under_load_without_recovery_is_bounded(runner, tmp_path, fio):
    r = runner(file_cfg(tmp_path, recovery="none"))
    dev = r.devices()["d"]
    load = fio_load(fio, dev["block"])
    r.kill(signal.SIGKILL)
    load.wait(120)
    assert load.returncode != 0     # its IO failed: the device is gone
    assert no_d_state() == []
    assert ublk.device_info(dev["id"]).state == "DEAD"
    ublk.cleanup_dead(include_quiesced=True)  # "other" (recovery: auto) waits, QUIESCED
