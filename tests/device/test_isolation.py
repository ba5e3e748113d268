"""isolate: true: a handler that exits, segfaults or hangs takes down only its own worker; the
supervisor restarts it, the device is recovered, and every other device keeps serving."""
import mmap
import os
import threading

import pytest

from runner import ublk

from .runnerproc import read_direct
from .test_recovery import Repeat, fio_verify

pytestmark = pytest.mark.device

PLUGIN = ("--plugin", "tests.device.faulty_plugin")
CRASH_AT = 1 << 20


def crashy(tmp_path, how):
    return f"""
  - name: {how}
    handler: crashy
    size: 16M
    isolate: true
    request_timeout: 3
    options: {{crash_offset: {CRASH_AT}, how: {how}, marker: {tmp_path / (how + '.marker')},
               store: {tmp_path / (how + '.store')}}}"""


def write_direct(path, offset, data):
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))
        buf[:] = data
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)


def test_crashing_handlers_only_take_down_their_own_device(runner, tmp_path, fio):
    cfg = "devices:" + "".join(crashy(tmp_path, how) for how in ("exit", "segv", "hang")) + f"""
  - name: steady
    handler: file
    size: 32M
    options: {{path: {tmp_path / 'steady.img'}, mode: python}}
  - name: plain
    handler: file
    size: 32M
    options: {{path: {tmp_path / 'plain.img'}}}
"""
    r = runner(cfg, extra_args=PLUGIN)
    assert not r.ready["failed"], r.ready
    before = {d["name"]: d for d in r.ready["ready"]}
    assert all(before[n]["mode"].startswith("worker:") for n in ("exit", "segv", "hang"))
    patterns = {how: os.urandom(4096) for how in ("exit", "segv", "hang")}
    for how, data in patterns.items():
        write_direct(before[how]["block"], CRASH_AT, data)
    loads = [Repeat(*fio_verify(fio, before["steady"]["block"])), Repeat(*fio_verify(fio, before["plain"]["block"]))]
    for t in loads:
        t.start()
    got = {}

    def read(how):
        try:
            got[how] = read_direct(before[how]["block"], CRASH_AT, 4096)
        except OSError as e:
            got[how] = e

    readers = [threading.Thread(target=read, args=(how,)) for how in patterns]
    try:
        for t in readers:
            t.start()
        for t in readers:
            t.join(300)
    finally:
        for t in loads:
            t.stop()
    # each crashing read was reissued to the restarted worker and answered with the data
    if got != patterns and os.environ.get("UBLK_TEST_LOGDIR"):
        with open(os.path.join(os.environ["UBLK_TEST_LOGDIR"], "isolation-runner.log"), "w") as f:
            f.write(r.log())
    assert got == patterns, (got, r.log())
    log = r.log()
    assert "worker pid" in log and "died (exit code 7)" in log, log
    assert "died (signal SIGSEGV)" in log, log
    assert "died (signal SIGKILL)" in log, log   # the hung worker killed itself
    assert "inside handler 'crashy'" in log, log
    after = {d["name"]: d for d in r.cli_json("list")["devices"]}
    for name, d in before.items():
        assert after[name]["block"] == d["block"], (name, after[name])
        assert after[name]["state"] == "LIVE", after[name]
    assert {n: after[n]["restarts"] for n in patterns} == {n: 1 for n in patterns}
    failures = [f for t in loads for f in t.failures]
    assert not failures, failures[0]
    assert all(t.runs > 0 for t in loads)
    ours = [i for i in ublk.list_devices() if i.ours]
    assert len(ours) == 5 and all(i.state == "LIVE" for i in ours), ours
