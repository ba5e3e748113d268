"""Shared pieces of the benchmarks: fio runs pinned to a CPU, served devices, the result table."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading

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

    def _serve(self, q_id, ready):
        os.sched_setaffinity(0, {SERVER_CPU})
        with self.dev.open_queue(q_id, native=self.native, pollable=self.pollable) as q:
            ready.set()
            try:
                while True:
                    reqs = q.wait(1.0)
                    if reqs:
                        self.handle(q, reqs)
            except QueueStopped:
                pass

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
    out = [title, f"{'target':44} {'IOPS':>10} {'lat us':>9} {'ratio':>7}"]
    for name, r in rows:
        out.append(f"{name:44} {r['iops']:10.0f} {r['lat_us']:9.1f} {r['iops'] / ref:7.2f}")
    out.append(f"(ratio = IOPS / {reference}; TCG guest, compare ratios within one run only)")
    return "\n".join(out)
