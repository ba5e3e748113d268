"""Shared pieces of the benchmarks: fio runs pinned to a CPU, served devices, the result table."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time

from runner.queue import QueueStopped
from runner.ublk import Device

FIO_CPU = 1      # the client's CPU
SERVER_CPU = 0   # queue threads; the VM has -smp 2 and the two must not share a vCPU (vm-testing.md)


def fio(filename: str, rw: str = "randread", runtime: int = 10, iodepth: int = 64, bs: str = "4k",
        size: str | None = None, extra: tuple = ()) -> dict:
    cmd = ["taskset", "-c", str(FIO_CPU), shutil.which("fio") or "fio", "--name=bench",
           f"--filename={filename}", "--ioengine=io_uring", "--direct=1", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={iodepth}", "--numjobs=1", f"--runtime={runtime}", "--ramp_time=1",
           "--time_based", "--norandommap", "--randrepeat=0", "--group_reporting",
           "--output-format=json", *([f"--size={size}"] if size else []), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 10 + 120)
    if p.returncode != 0:
        raise RuntimeError(f"fio on {filename} failed: {p.stderr.strip()}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {"iops": side["iops"], "lat_us": side["lat_ns"]["mean"] / 1000.0}


WORKLOADS = ("randread", "randwrite")


def both(dev: str, runtime: int) -> dict:
    """4k randread and randwrite on ``dev``: {workload: fio result}."""
    return {rw: fio(dev, rw=rw, runtime=runtime) for rw in WORKLOADS}


def wait_for(pred, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def runner_device(cfg, handler_cls, plugins, runtime: int, stats=None) -> dict:
    """Serve ``cfg`` with the runner's own DeviceServer (queue threads inherit the caller's CPU
    affinity) and run ``both`` on it; ``stats(server, result)`` may add to the result."""
    from runner.server import DeviceServer
    srv = DeviceServer(cfg, handler_cls, plugins)
    srv.start()
    try:
        res = both(srv.device.block_path, runtime)
        if stats:
            stats(srv, res)
        return res
    finally:
        srv.stop()


def over_nbd(server_cmd: list, sock: str, runtime: int, nbd_dev: str = "/dev/nbd0") -> dict:
    """Start an NBD server (``server_cmd`` serving on the unix socket ``sock``) pinned to
    SERVER_CPU, attach it as ``nbd_dev`` with nbd-client and run ``both`` on it."""
    proc = subprocess.Popen(["taskset", "-c", str(SERVER_CPU), *server_cmd])
    try:
        wait_for(lambda: os.path.exists(sock), f"{server_cmd[0]}'s socket")
        p = subprocess.run(["nbd-client", "-unix", sock, nbd_dev, "-b", "4096"], capture_output=True,
                           text=True, timeout=60)
        if p.returncode:
            raise RuntimeError(f"nbd-client {nbd_dev}: {p.stdout}{p.stderr}")
        try:
            return both(nbd_dev, runtime)
        finally:
            subprocess.run(["nbd-client", "-d", nbd_dev], capture_output=True, timeout=60)
    finally:
        proc.terminate()
        proc.wait(30)


CONFIGFS_TARGET = "/sys/kernel/config/target"


@contextlib.contextmanager
def tcmu_disk(config: str, size: int, name: str, cpus: str):
    """A tcmu-runner handler's device (``config`` is its cfgstring, e.g. ``qcow/PATH`` or
    ``rbd/POOL/IMAGE;conf=...``) as a user: backstore, exported as a local SCSI disk by
    tcm_loop; yields the /dev/sdX path.  Set up through configfs directly: targetcli needs
    tcmu-runner on D-Bus, and the VM runs no D-Bus daemon.  Needs the modules
    target_core_user, tcm_loop and sd_mod; tcmu-runner runs on ``cpus`` (taskset list)."""
    import glob
    before = set(glob.glob("/sys/block/sd*"))
    log_dir = "/run/tcmu-bench"
    os.makedirs(log_dir, exist_ok=True)
    proc = subprocess.Popen(["taskset", "-c", cpus, "tcmu-runner", "-l", log_dir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    backstore = f"{CONFIGFS_TARGET}/core/user_1/{name}"
    wwn = f"{CONFIGFS_TARGET}/loopback/naa.5001405bench0001"
    tpg = f"{wwn}/tpgt_1"
    lun = f"{tpg}/lun/lun_0"
    try:
        time.sleep(2)   # tcmu-runner registers its handlers with the kernel over netlink
        os.makedirs(backstore)
        for setting in (f"dev_config={config}", f"dev_size={size}"):
            with open(f"{backstore}/control", "w") as f:
                f.write(setting)
        with open(f"{backstore}/enable", "w") as f:
            f.write("1")
        os.makedirs(lun)
        with open(f"{tpg}/nexus", "w") as f:
            f.write("naa.5001405bench0002")
        os.symlink(backstore, f"{lun}/{name}")
        try:
            wait_for(lambda: set(glob.glob("/sys/block/sd*")) - before, "the tcm_loop SCSI disk", 30)
        except RuntimeError:
            logs = "".join(open(f).read()[-2000:] for f in glob.glob(f"{log_dir}/*"))
            raise RuntimeError(f"no SCSI disk appeared; tcmu-runner alive: {proc.poll() is None}; "
                               f"log: {logs or '(none)'}") from None
        disk = "/dev/" + os.path.basename(sorted(set(glob.glob("/sys/block/sd*")) - before)[0])
        wait_for(lambda: os.path.exists(disk), disk)
        yield disk
    finally:
        for undo in (lambda: os.unlink(f"{lun}/{name}"), lambda: os.rmdir(lun),
                     lambda: os.rmdir(tpg), lambda: os.rmdir(wwn), lambda: os.rmdir(backstore)):
            try:
                undo()
            except OSError:
                pass
        proc.terminate()
        proc.wait(30)


class ServedDevice:
    """A ublk device whose queues are served by threads pinned to SERVER_CPU.

    ``handle(queue, requests)`` is called per batch; ``native`` makes the core serve it alone."""

    def __init__(self, size: int, handle=None, native: str | None = None, queues: int = 1,
                 depth: int = 128, pollable: bool = True, **add_kw):
        self.pollable = pollable
        self.dev = Device.add(size, queues=queues, depth=depth, **add_kw)
        self.handle = handle
        self.native = native
        self.threads = []
        self.queues = []

    def _serve(self, q_id, ready):
        os.sched_setaffinity(0, {SERVER_CPU})
        with self.dev.open_queue(q_id, native=self.native, pollable=self.pollable) as q:
            self.queues.append(q)
            ready.set()
            try:
                while True:
                    reqs = q.wait(1.0)
                    if reqs:
                        self.handle(q, reqs)
            except QueueStopped:
                pass

    def counters(self) -> dict:
        """The served queues' counters, summed: requests, ``waits`` (the queue thread slept in
        io_uring_enter) and ``batches`` (ring passes that handed requests to Python)."""
        out = {"requests": 0, "waits": 0, "batches": 0}
        for q in self.queues:
            st = q.stats()
            out["requests"] += sum(st["ops"].values())
            out["waits"] += st["waits"]
            out["batches"] += st["batches"]
        return out

    def __enter__(self):
        for q_id in range(self.dev.info.nr_queues):
            ready = threading.Event()
            t = threading.Thread(target=self._serve, args=(q_id, ready), daemon=True)
            t.start()
            ready.wait(30)
            self.threads.append(t)
        self.dev.start()
        return self.dev

    def __exit__(self, *exc):
        self.dev.stop()
        for t in self.threads:
            t.join(30)
        self.dev.delete()


def table(title: str, rows: list[tuple[str, dict]], reference: str) -> str:
    ref = next(r for name, r in rows if name == reference)["iops"]
    w = max([len(name) for name, _ in rows] + [6])
    out = [title, f"{'target':{w}} {'IOPS':>10} {'lat us':>9} {'ratio':>7}"]
    for name, r in rows:
        out.append(f"{name:{w}} {r['iops']:10.0f} {r['lat_us']:9.1f} {r['iops'] / ref:7.2f}")
    out.append(f"(ratio = IOPS / {reference}; TCG guest, compare ratios within one run only)")
    return "\n".join(out)


def save_results(path: str, bench: str, title: str, reference: str, rows: dict, **extra) -> None:
    """Write one bench run as JSON in the shape ``bench/plot.py`` reads.

    ``rows`` maps target → workload (``randread``, ...) → fio result (``iops``, ``lat_us``);
    other keys of a target are kept as they are.  ``reference`` is the target every ratio of
    this run is taken against.  Host facts go along because they decide how far one run can be
    trusted (a busy host moves absolute IOPS by 2x or more)."""
    import datetime
    import platform
    doc = {"bench": bench, "title": title, "reference": reference,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "kernel": platform.release(), "cpus": os.cpu_count(), "rows": rows, **extra}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
