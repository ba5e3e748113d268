import errno
import os
import subprocess
import sys
import threading
import time

import pytest

from runner import ublk
from runner.queue import QueueStopped

from .memserver import MemServer

pytestmark = pytest.mark.device


def test_features_reported():
    feats = ublk.get_features()
    names = ublk.flag_names(feats)
    assert "CMD_IOCTL_ENCODE" in names and "USER_COPY" in names, names
    print("features", hex(feats), names)


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_add_start_stop_delete_50_times_leaks_nothing():
    ids = set()
    fds_before = _open_fds()
    for _ in range(50):
        with MemServer(size=8 << 20, depth=16) as srv:
            ids.add(srv.dev.dev_id)
            assert os.path.exists(srv.dev.block_path)
    assert _open_fds() == fds_before
    assert not [d for d in ublk.list_devices() if d.ours]
    # ids are reused, never leaked: the auto allocator keeps handing out the lowest free one
    assert len(ids) <= 2, ids


def test_fixed_id_and_info_and_params():
    with MemServer(size=32 << 20, dev_id=7, logical_block_size=4096, physical_block_size=4096,
                   volatile_cache=True, fua=True, discard_granularity=4096,
                   max_discard_bytes=8 << 20, max_write_zeroes_bytes=8 << 20) as srv:
        dev = srv.dev
        assert dev.dev_id == 7
        info = dev.refresh_info()
        assert info.state == "LIVE" and info.pid == os.getpid() and info.ours
        p = dev.get_params()
        assert (p.size, p.logical_block_size, p.volatile_cache, p.fua) == (32 << 20, 4096, True, True)
        sysfs = "/sys/block/ublkb7/queue/"
        assert open(sysfs + "logical_block_size").read().strip() == "4096"
        assert open(sysfs + "discard_granularity").read().strip() == "4096"
        assert [d.dev_id for d in ublk.list_devices() if d.state == "LIVE"] == [7]


def test_depth_5000_is_a_clear_kernel_refusal():
    with pytest.raises(ublk.UblkError) as ei:
        ublk.Device.add(8 << 20, depth=5000)
    e = ei.value
    assert e.errno == errno.EINVAL and e.command == "ADD_DEV"
    assert "ADD_DEV" in str(e) and "depth=5000" in str(e) and "EINVAL" in str(e)


def test_max_sectors_beyond_io_buffer_is_a_clear_refusal_and_deletes_the_device():
    with pytest.raises(ublk.UblkError) as ei:
        ublk.Device.add(8 << 20, max_io_bytes=1 << 20, max_request_bytes=4 << 20)
    assert ei.value.errno == errno.EINVAL and ei.value.command == "SET_PARAMS"
    assert "max_io_bytes=1048576" in str(ei.value)
    assert not [d for d in ublk.list_devices() if d.ours]


def test_duplicate_fixed_id_is_refused():
    with MemServer(size=8 << 20, dev_id=3):
        with pytest.raises(ublk.UblkError) as ei:
            ublk.Device.add(8 << 20, dev_id=3)
        assert ei.value.errno == errno.EEXIST and "ublk device 3" in str(ei.value)


def test_queue_stops_when_device_stops():
    dev = ublk.Device.add(8 << 20, depth=4)
    result = {}

    def serve():
        with dev.open_queue(0) as q:
            result["ready"] = True
            try:
                while True:
                    for r in q.wait(0.5):
                        q.complete(r, r.length)
            except QueueStopped:
                result["stopped"] = q.stats()["aborted"]

    t = threading.Thread(target=serve)
    t.start()
    while "ready" not in result:
        time.sleep(0.01)
    dev.start()
    dev.stop()
    t.join(30)
    dev.delete()
    assert result["stopped"] == 4


def test_context_manager_cleans_up_on_exception():
    with pytest.raises(RuntimeError):
        with ublk.Device.add(8 << 20) as dev:
            dev_id = dev.dev_id
            raise RuntimeError("backend failed")
    assert dev_id not in [d.dev_id for d in ublk.list_devices()]


SERVE_THEN_WAIT = r"""
import sys, threading
from runner.ublk import Device
from runner.queue import QueueStopped
dev = Device.add(8 << 20)
ready = threading.Event()
def serve():
    with dev.open_queue(0) as q:
        ready.set()
        try:
            while True:
                for r in q.wait():
                    q.complete(r, r.length)
        except QueueStopped:
            pass
threading.Thread(target=serve, daemon=True).start()
ready.wait()
dev.start()
print(dev.dev_id, flush=True)
{ending}
"""


@pytest.mark.parametrize("ending", ["sys.exit(0)", "raise SystemExit(3)", "raise KeyboardInterrupt"])
def test_process_exit_deletes_its_devices(ending):
    p = subprocess.run([sys.executable, "-c", SERVE_THEN_WAIT.format(ending=ending)],
                       capture_output=True, text=True, timeout=60)
    dev_id = int(p.stdout.split()[0])
    deadline = time.monotonic() + 10
    while dev_id in [d.dev_id for d in ublk.list_devices()] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dev_id not in [d.dev_id for d in ublk.list_devices()], p.stderr


def test_sigkill_then_cleanup_helper_leaves_nothing():
    p = subprocess.Popen([sys.executable, "-c", SERVE_THEN_WAIT.format(ending="threading.Event().wait()")],
                         stdout=subprocess.PIPE, text=True)
    dev_id = int(p.stdout.readline())
    p.kill()
    p.wait(30)
    deadline = time.monotonic() + 10
    while ublk.device_info(dev_id).state != "DEAD" and time.monotonic() < deadline:
        time.sleep(0.05)
    info = ublk.device_info(dev_id)
    assert info.state == "DEAD" and not info.server_alive
    out = subprocess.run([sys.executable, "-m", "runner.cli", "cleanup"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert str(dev_id) in out.stdout
    assert dev_id not in [d.dev_id for d in ublk.list_devices()]
    assert not os.path.exists(f"/dev/ublkc{dev_id}")
