import errno
import fcntl
import mmap
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest


from .runnerproc import REPO, read_direct, sh
from .test_io import run_fio

pytestmark = pytest.mark.device

BLKZEROOUT = 0x127F  # _IO(0x12, 127)


def file_device(name, path, size="128M", queues=1, **opts):
    opts = "".join(f"\n      {k}: {v}" for k, v in opts.items())
    return f"""
  - name: {name}
    handler: file
    size: {size}
    queues: {queues}
    options:
      path: {path}{opts}"""


@pytest.mark.parametrize("mode,direct", [("native", "false"), ("native", "true"), ("python", "false")])
def test_ext4_on_a_file_device(runner, tmp_path, mode, direct):
    r = runner("devices:" + file_device("disk", tmp_path / "disk.img", "192M", mode=mode, direct=direct))
    dev = r.devices()["disk"]["block"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tree = os.path.join(REPO, "runner")
    sh("mkfs.ext4", "-q", dev)
    sh("mount", dev, str(mnt))
    try:
        shutil.copytree(tree, mnt / "tree", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    finally:
        sh("umount", str(mnt))
    assert sh("fsck.ext4", "-f", "-n", dev).returncode == 0
    sh("mount", dev, str(mnt))
    try:
        assert sh("diff", "-r", "-x", "*.so", "-x", "__pycache__", tree, str(mnt / "tree")).returncode == 0
    finally:
        sh("umount", str(mnt))
    st = r.cli_json("stats", "disk")["disk"]["total"]
    assert st["errors"] == 0 and st["ops"]["write"] > 0


@pytest.mark.parametrize("mode", ["native", "python"])
def test_fio_verify_on_a_file_device_with_2_queues(runner, tmp_path, fio, mode):
    r = runner("devices:" + file_device("disk", tmp_path / "d.img", "64M", queues=2, mode=mode))
    run_fio(fio, r.devices()["disk"]["block"])
    # what fio wrote is in the backing file: read it back through the device and compare
    img = (tmp_path / "d.img").read_bytes()[:1 << 20]
    assert read_direct(r.devices()["disk"]["block"], 0, 1 << 20) == img


def test_sighup_adds_removes_and_keeps_devices(runner, tmp_path):
    a, b, c = (file_device(n, tmp_path / f"{n}.img", "32M") for n in "abc")
    r = runner("devices:" + a + b)
    before = r.devices()
    r.write_config("devices:" + b + c)
    r.proc.send_signal(1)  # SIGHUP
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = r.devices()
        if set(now) == {"b", "c"}:
            break
        time.sleep(0.2)
    now = r.devices()
    assert set(now) == {"b", "c"}, r.log()
    assert now["b"]["id"] == before["b"]["id"]          # untouched
    kernel_ids = {d["id"] for d in r.cli_json("kernel-list") if d["ours"]}
    assert kernel_ids == {now["b"]["id"], now["c"]["id"]}  # a was removed
    assert read_direct(now["c"]["block"], 0, 4096) == bytes(4096)


def test_list_json_matches_the_kernel(runner, tmp_path):
    r = runner("devices:" + file_device("x", tmp_path / "x.img", "16M") + """
  - name: n
    handler: "null"
    size: 1G
    queues: 2""")
    ours = r.devices()
    kernel = {d["id"]: d for d in r.cli_json("kernel-list")}
    for d in ours.values():
        k = kernel[d["id"]]
        assert k["state"] == d["state"] == "LIVE"
        assert k["queues"] == d["queues"] and k["block"] == d["block"] and k["ours"]


def test_a_raising_handler_fails_the_request_not_the_runner(runner, tmp_path):
    r = runner("""
devices:
  - name: bad
    handler: faulty
    size: 16M
    options: {bad_offset: 1048576}
  - name: good
    handler: "null"
    size: 16M
""", extra_args=("--plugin", "tests.device.faulty_plugin"))
    devs = r.devices()
    with pytest.raises(OSError) as ei:
        read_direct(devs["bad"]["block"], 1 << 20, 4096)
    assert ei.value.errno == errno.EIO
    assert read_direct(devs["bad"]["block"], 0, 4096) == bytes(4096)   # the same device still serves
    assert len(read_direct(devs["good"]["block"], 0, 4096)) == 4096    # and so do the others
    assert "simulated backend failure" in r.log() and "device bad" in r.log()
    assert r.proc.poll() is None


def test_a_device_that_cannot_start_does_not_stop_the_others(runner, tmp_path):
    r = runner("devices:" + file_device("broken", "/nonexistent/dir/x.img", "16M")
               + file_device("fine", tmp_path / "f.img", "16M"))
    listing = r.cli_json("list")
    assert "broken" in listing["failed"] and "No such file" in listing["failed"]["broken"]
    assert [d["name"] for d in listing["devices"]] == ["fine"]


def test_control_socket_add_and_del(runner, tmp_path):
    r = runner("devices: []")
    out = r.cli_json("add", "extra", "--handler", "file", "--size", "32M", "-o", f"path={tmp_path}/e.img")
    assert os.path.exists(out["block"])
    bad = r.cli("add", "x2", "--handler", "file", "--size", "32M", check=False)
    assert bad.returncode != 0 and "path" in bad.stderr   # missing required option, named
    r.cli("del", "extra")
    assert not os.path.exists(out["block"])
    assert r.devices() == {}


def test_null_injects_errors_and_latency(runner):
    r = runner("""
devices:
  - name: n
    handler: "null"
    size: 64M
    options: {fail_ops: [write], error: ENOSPC, latency_us: 2000}
""")
    dev = r.devices()["n"]["block"]
    assert len(read_direct(dev, 0, 4096)) == 4096
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        with pytest.raises(OSError) as ei:
            os.pwritev(fd, [buf], 0)
        assert ei.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def sample_venv(tmp_path) -> str:
    """A fresh venv with the handler guide's example package (docs/examples/handler)
    pip-installed, layered over the project's env.

    scripts/test builds it on the host before the VM boots (pip under TCG takes minutes) and
    passes it in UBLK_SAMPLE_VENV; without that the test builds its own."""
    prebuilt = os.environ.get("UBLK_SAMPLE_VENV")
    if prebuilt and os.path.exists(os.path.join(prebuilt, "bin", "python")):
        return os.path.join(prebuilt, "bin", "python")
    venv = tmp_path / "venv"
    sh(sys.executable, os.path.join(REPO, "tests", "make_sample_venv.py"), str(venv))
    return str(venv / "bin" / "python")


def test_the_docs_example_handler_installed_with_pip_serves_a_device(runner, tmp_path, fio):
    python = sample_venv(tmp_path)
    r = runner("""
devices:
  - name: s
    handler: checksum-mem
    size: 64M
    options: {fill: 171}
""", python=python)
    plugins = r.cli_json("plugins")
    example = [p for p in plugins if "checksum-mem" in (p.get("handlers") or ())]
    assert example and example[0]["distribution"] == "ublk-runner-example-checksum", plugins
    block = r.devices()["s"]["block"]
    assert read_direct(block, 8192, 4096) == b"\xab" * 4096
    run_fio(fio, block)   # every read checks the handler's CRCs, then fio checks its own
    sh("mkfs.ext4", "-q", block)
    assert sh("fsck.ext4", "-f", "-n", block).returncode == 0
    st = r.cli_json("stats", "s")["s"]["total"]
    assert st["errors"] == 0 and st["ops"]["write"] > 0 and st["ops"]["discard"] > 0


def test_prometheus_metrics_come_from_the_core_counters(runner):
    subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True)
    r = runner("""
runner:
  metrics: {prometheus_port: 19477, prometheus_addr: 127.0.0.1}
devices:
  - name: n
    handler: "null"
    size: 64M
""")
    dev = r.devices()["n"]["block"]
    for i in range(5):
        read_direct(dev, i * 4096, 4096)
    import urllib.request
    text = urllib.request.urlopen("http://127.0.0.1:19477/metrics", timeout=30).read().decode()
    from prometheus_client.parser import text_string_to_metric_families
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    reads = samples[("ublk_requests_total", (("device", "n"), ("op", "read"), ("queue", "0")))]
    assert reads >= 5
    assert samples[("ublk_request_latency_seconds_count", (("device", "n"), ("queue", "0")))] >= reads


def test_asyncio_serialize_handler_is_entered_from_one_thread_with_2_queues(runner, fio):
    # one fio job per CPU so both queues get requests; the handler fails any request that
    # reaches it from a second thread, so a single verify error or request error means two
    r = runner("""
devices:
  - name: a
    handler: one-thread-async
    size: 16M
    queues: 2""", extra_args=("--plugin", "tests.device.faulty_plugin"))
    block = r.devices()["a"]["block"]
    run_fio(fio, block, "--size=4M", "--numjobs=2", "--offset_increment=4M", "--cpus_allowed=0-1",
            "--cpus_allowed_policy=split")
    # BLKZEROOUT: the handler refuses write-zeroes, the runner writes zeros through write()
    fd = os.open(block, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xaa" * 65536, 1 << 20)
        os.fsync(fd)
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", 1 << 20, 65536))
    finally:
        os.close(fd)
    assert read_direct(block, 1 << 20, 65536) == bytes(65536)
    st = r.cli_json("stats", "a")["a"]
    assert st["total"]["errors"] == 0, st
    assert st["total"]["ops"]["write_zeroes"] > 0, st
    assert all(q["ops"].get("write", 0) > 0 for q in st["queues"].values()), st  # both queues
