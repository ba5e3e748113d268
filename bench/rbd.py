"""One RBD image, five ways to reach it: this project's ``rbd`` handler (ublk), the kernel's rbd
client (krbd, ``rbd map``), ``rbd-nbd`` (librbd behind /dev/nbdX), tcmu-runner's rbd handler
(librbd behind LIO's tcm_loop) and ``rbd bench`` (librbd's C++ API with no block device at all:
the ceiling for every librbd-based path). fio 4k randread and randwrite, io_uring, direct,
iodepth 64, one job pinned to CPU 1; the userspace servers (runner, rbd-nbd, tcmu-runner and
``rbd bench``, with all their threads) may run on both vCPUs, like krbd's kernel threads and the
Ceph daemons (``--server-cpus 0`` pins them to CPU 0 instead, as before 2026-11-29; ``rbd
bench`` ran on CPU 1 alone until the third round).

A throw-away cluster (one monitor, one memstore OSD) is brought up on the VM's loopback by
tests/ceph/cluster.py; the image is written in full first, so no target reads holes that the
object map answers without the OSD. librbd's cache is turned off (``rbd_cache=false``) for the
librbd-based targets by default, so that every write reaches the OSD as it does with krbd; pass
``--cache`` to keep librbd's default write-around cache.

Run in the VM (needs the rbd and nbd modules; rbd-nbd from ``scripts/setup --bench``)::

    tests/vm/run .venv/bin/python bench/rbd.py      # loads crc32c_generic, rbd, nbd itself

Measured (2026-11-29, first round, servers pinned to CPU 0; TCG guest on 2 host cores shared
with other sessions' VMs; IOPS and ratio to ``rbd bench``; the second round, with the servers on
both vCPUs, is in bench/README.md and docs/performance.rst)::

    target                               randread                randwrite
    rbd bench (librbd C++)               400 / 344               156 / 165
    handler, native C path, 1 queue      149 (0.37) / 200 (0.58)  74 (0.48) / 83 (0.50)
    handler, native: false (Python)       41 (0.10) /  36 (0.10)  57 (0.36) / 41 (0.25)
    handler API, no kernel (Python)       56 (0.14) /  82 (0.24)  59 (0.37) / 53 (0.32)
    krbd                                 311 (0.78) / 339 (0.99) 168 (1.07) / 92 (0.56)
    rbd-nbd                              168 (0.42) / 122 (0.36)  72 (0.46) / 65 (0.39)

The native path (plugins/rbd/rbdio.c) takes each batch from the ring to librbd's C API in one
call and completes from librbd's callback through the core, with no Python per request; the
Python path pays a Python call per request on the queue thread plus a GIL-taking Python
callback on librbd's thread, and its API alone (no kernel) stays below 0.25 of ``rbd bench``
for reads. krbd stays ahead: its client is in the kernel, while every librbd-based path pays
librbd's own CPU cost (the bulk under TCG) on the server's vCPU.

tcmu-runner's rbd handler (librbd too, behind LIO's tcm_loop as a SCSI disk; target ``tcmu``)
is set up through configfs directly (bench/common.py ``tcmu_disk``): targetcli would need
tcmu-runner on D-Bus, which the test VM does not run.

``--rounds N`` measures the targets in turn N times and reports medians, with each target's
per-round ratio to the first target: the host's load drifts over minutes (other sessions' VMs
share its 2 cores), and one round moves a ratio by up to 2x. ``--threads`` prints which guest
threads used the CPU, per request.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# This file is called rbd.py: with its directory on sys.path, "import rbd" (the Ceph binding,
# used by tests/ceph/cluster.py) would import this script instead. Take the directory off and
# load bench/common.py by path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, REPO)
_spec = importlib.util.spec_from_file_location("ublk_bench_common", os.path.join(HERE, "common.py"))
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
FIO_CPU, SERVER_CPU, fio, table = _common.FIO_CPU, _common.SERVER_CPU, _common.fio, _common.table
save_results, tcmu_disk = _common.save_results, _common.tcmu_disk

MiB = 1 << 20


def cluster_module():
    spec = importlib.util.spec_from_file_location("ublk_tests_ceph_cluster",
                                                  os.path.join(REPO, "tests", "ceph", "cluster.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def cpu_times():
    """The guest's aggregate /proc/stat CPU times (jiffies): all fields, and idle + iowait."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]


def cpu_busy(a, b):
    """Share of both vCPUs' time spent not idle between two cpu_times() (fio and the ramp
    included): tells whether a run is bound by guest CPU or by waiting (wake-ups)."""
    total, idle = b[0] - a[0], b[1] - a[1]
    return 1 - idle / total if total else 0.0


def thread_cpu():
    """{(process name, thread name): CPU ticks} over every thread in the guest, kernel threads
    included; thread names lose their digits (msgr-worker-0 -> msgr-worker-#) so that threads of
    one role add up."""
    out: dict = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                proc = f.read().strip()
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        if proc.startswith("kworker") or "/" in proc:
            proc = re.sub(r"[/:].*", "", proc)
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            name = re.sub(r"\d+", "#", st[st.index("(") + 1:st.rindex(")")])
            name = re.sub(r"[/:].*", "", name)
            v = st[st.rindex(")") + 2:].split()
            key = (re.sub(r"\d+", "#", proc), name)
            out[key] = out.get(key, 0) + int(v[11]) + int(v[12])  # utime + stime
    return out


def top_threads(a, b, requests, n=8):
    """The n threads (by role) that used the most guest CPU between two thread_cpu() snapshots,
    in microseconds per request."""
    hz = os.sysconf("SC_CLK_TCK")
    d = {k: v - a.get(k, 0) for k, v in b.items() if v - a.get(k, 0) > 0}
    total = sum(d.values())
    rows = sorted(d.items(), key=lambda kv: -kv[1])[:n]
    per = lambda t: t / hz / max(1, requests) * 1e6
    return (f"{per(total):.0f} us/req: " +
            ", ".join(f"{p}:{t} {per(v):.0f}" for (p, t), v in rows))


def run(*cmd, timeout=600, check=True):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        if check:
            raise
        return subprocess.CompletedProcess(cmd, 124, e.stdout or "", f"timed out after {timeout}s")
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} -> {p.returncode}: {p.stdout}{p.stderr}")
    return p


class Bench:
    def __init__(self, args):
        self.args = args
        self.rows: dict[str, list[tuple[str, dict]]] = {"randread": [], "randwrite": []}
        self.skipped: list[str] = []

    def ceph_args(self):
        i = self.info
        return ["--conf", i["conf"], "--id", i["client_id"], "--keyring", i["keyring"]]

    def measure(self, label, path, counters=None):
        for rw in ("randread", "randwrite"):
            before = counters() if counters else None
            cpu0 = cpu_times()
            threads0 = thread_cpu() if self.args.threads else None
            perf = None
            if self.args.perf and shutil.which("perf"):
                # system-wide CPU samples by thread, to see which CPU work each path costs
                tag = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
                perf = subprocess.Popen(
                    ["perf", "record", "-a", "-F", "199", "-o",
                     os.path.join(self.args.perf, f"perf-{tag}-{rw}.data"), "--",
                     "sleep", str(self.args.runtime)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            r = fio(path, rw=rw, runtime=self.args.runtime, iodepth=64)
            if perf is not None:
                perf.wait(timeout=120)
            busy = cpu_busy(cpu0, cpu_times())
            if threads0 is not None:
                # fio's ramp second is inside the snapshot: slightly over-counts per request
                print(f"  {'':40} {rw:9} CPU "
                      f"{top_threads(threads0, thread_cpu(), r['iops'] * (self.args.runtime + 1))}",
                      flush=True)
            print(f"  {label:40} {rw:9} {r['iops']:9.0f} IOPS {r['lat_us']:9.1f} us "
                  f"(guest CPUs {busy:.0%} busy)", flush=True)
            r["guest_busy"] = busy
            if counters:
                # per request: how often librbd's thread woke the queue thread, how often the
                # queue thread slept, and how many requests each ring pass handed to librbd
                d = {k: v - before[k] for k, v in counters().items()}
                reqs = max(1, d["requests"])
                print(f"  {'':40} {rw:9} signals/req {d['signals'] / reqs:.2f} "
                      f"waits/req {d['waits'] / reqs:.2f} req/batch "
                      f"{d['requests'] / max(1, d['batches']):.1f}", flush=True)
            self.rows[rw].append((label, r))

    # ---- targets ------------------------------------------------------------------------------
    def ublk(self, tmp, native=True, queues=None):
        queues = queues or self.args.queues
        from tests.device.runnerproc import RunnerProcess
        i = self.info
        copts = ([] if self.args.cache else ["rbd_cache=false"]) + self.args.librbd_opt
        opts = f"\n      ceph_options: {json.dumps(copts)}" if copts else ""
        if not native:
            opts += "\n      native: false"
        r = RunnerProcess(Path(tmp), f"""
devices:
  - name: rbdbench
    handler: rbd
    queues: {queues}
    depth: 128
    options:
      pool: {i['pool']}
      image: {self.image}
      conf: {i['conf']}
      client: {i['client_id']}
      keyring: {i['keyring']}{opts}
""")
        try:
            run("taskset", "-a", "-p", "-c", self.args.server_cpus, str(r.proc.pid))
            d = r.devices()["rbdbench"]
            path = "native C path" if native else "Python path"
            label = f"ublk-runner rbd, {path} ({queues}q)"
            print(f"  {label}: mode {d.get('mode')}", flush=True)
            prof = None
            if self.args.profile and shutil.which("py-spy"):
                # sampling costs CPU on the server's CPU: profile runs are not benchmark runs
                out = os.path.join(self.args.profile, f"pyspy-{'native' if native else 'python'}")
                prof = subprocess.Popen(
                    ["py-spy", "record", "--threads", "--native", "-r", "50", "-f", "raw",
                     "-d", str(2 * self.args.runtime + 4), "-o", out + ".txt",
                     "-p", str(r.proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

            def counters():
                qs = r.cli_json("stats", "rbdbench")["rbdbench"]["queues"].values()
                out = {k: sum(q[k] for q in qs) for k in ("signals", "waits", "batches")}
                out["requests"] = sum(sum(q["ops"].values()) for q in qs)
                return out
            self.measure(label, d["block"], counters)
            if prof is not None:
                prof.wait(timeout=120)
        finally:
            rc = r.stop()
            if rc != 0:
                print(r.log()[-3000:], file=sys.stderr)

    def krbd(self):
        p = run("rbd", "map", *self.ceph_args(), "-o", "ms_mode=crc,noudev",
                f"{self.info['pool']}/{self.image}", check=False, timeout=120)
        if p.returncode != 0:
            self.skipped.append(f"krbd: rbd map failed: {p.stderr.strip()[-300:]}")
            return
        dev = p.stdout.strip()
        try:
            self.measure("kernel rbd (krbd, rbd map)", dev)
        finally:
            run("rbd", "unmap", "-o", "noudev", dev, check=False, timeout=120)

    def nbd(self):
        if not shutil.which("rbd-nbd"):
            self.skipped.append("rbd-nbd: not installed (scripts/setup --bench)")
            return
        cache = ([] if self.args.cache else ["--rbd_cache=false"]) + \
            [f"--{o}" for o in self.args.librbd_opt]
        p = run("taskset", "-c", self.args.server_cpus, "rbd-nbd", "map", *self.ceph_args(), *cache,
                f"{self.info['pool']}/{self.image}", check=False, timeout=120)
        if p.returncode != 0:
            self.skipped.append(f"rbd-nbd: map failed: {p.stderr.strip()[-300:]}")
            return
        dev = p.stdout.strip()
        try:
            self.measure("rbd-nbd (librbd behind /dev/nbd)", dev)
        finally:
            run("rbd-nbd", "unmap", dev, check=False, timeout=120)

    def tcmu(self):
        """tcmu-runner's rbd handler (librbd, like ours) behind LIO's tcm_loop as /dev/sdX."""
        if not shutil.which("tcmu-runner"):
            self.skipped.append("tcmu-runner: not installed (scripts/setup --bench)")
            return
        i = self.info
        # its cfgstring takes conf= and id=, not a keyring: a conf of its own names the keyring
        conf = os.path.join(os.path.dirname(i["conf"]), "tcmu-ceph.conf")
        settings = [f"keyring = {i['keyring']}"] + \
            ([] if self.args.cache else ["rbd cache = false"]) + \
            [o.replace("=", " = ", 1) for o in self.args.librbd_opt]
        with open(i["conf"]) as src, open(conf, "w") as f:
            f.write(src.read() + f"\n[client.{i['client_id']}]\n" +
                    "".join(f"{x}\n" for x in settings))
        cfg = f"rbd/{i['pool']}/{self.image};conf={conf};id={i['client_id']}"
        try:
            with tcmu_disk(cfg, self.args.size, "rbdbench", self.args.server_cpus) as disk:
                self.measure("tcmu-runner rbd handler (tcm_loop)", disk)
        except RuntimeError as e:
            self.skipped.append(f"tcmu-runner rbd: {e}"[-400:])

    def rbd_bench(self):
        cache = ([] if self.args.cache else ["--rbd_cache=false"]) + \
            [f"--{o}" for o in self.args.librbd_opt]
        for rw, io_type in (("randread", "read"), ("randwrite", "write")):
            t0 = time.monotonic()
            p = run("taskset", "-c", self.args.server_cpus, "rbd", "bench", *self.ceph_args(), *cache,
                    "--io-type", io_type, "--io-size", "4K", "--io-threads", "64",
                    "--io-pattern", "rand", "--io-total", str(self.args.bench_total),
                    f"{self.info['pool']}/{self.image}", timeout=900)
            m = re.search(r"elapsed:\s*([\d.]+)\s+ops:\s*(\d+)\s+ops/sec:\s*([\d.]+)", p.stdout)
            if not m:
                self.skipped.append(f"rbd bench {rw}: unparsable output {p.stdout[-300:]!r}")
                continue
            iops = float(m.group(3))
            r = {"iops": iops, "lat_us": 64 / iops * 1e6}  # Little's law; rbd bench has no latency
            print(f"  {'rbd bench (librbd C++, no block device)':40} {rw:9} {iops:9.0f} IOPS "
                  f"({time.monotonic() - t0:.0f}s)", flush=True)
            self.rows[rw].append(("rbd bench (librbd C++, no block device)", r))

    def api(self):
        """The handler's IO methods called directly (no kernel, no runner): what Python + the
        binding + librbd cost before ublk is involved."""
        import random
        import threading
        from runner.handler import DeviceSpec, validate_options
        from ublk_plugins.rbd.handler import RbdHandler
        i = self.info
        raw = dict(pool=i["pool"], image=self.image, conf=i["conf"], client=i["client_id"],
                   keyring=i["keyring"])
        raw["ceph_options"] = ([] if self.args.cache else ["rbd_cache=false"]) + \
            self.args.librbd_opt
        opts, errors = validate_options(RbdHandler.options_schema, raw)
        assert not errors, errors
        os.sched_setaffinity(0, {SERVER_CPU})
        h = RbdHandler.open(opts, DeviceSpec(name="api"))
        try:
            nblk = h.size // 4096
            for rw in ("randread", "randwrite"):
                sem = threading.Semaphore(64)
                lock = threading.Lock()
                stats = {"n": 0, "lat": 0.0}
                rng = random.Random(7)
                bufs = [bytearray(4096) for _ in range(64)]

                def done(f, t0):
                    dt = time.monotonic() - t0
                    with lock:
                        stats["n"] += 1
                        stats["lat"] += dt
                    sem.release()
                t_end = time.monotonic() + self.args.runtime
                k = 0
                while time.monotonic() < t_end:
                    sem.acquire()
                    off = rng.randrange(nblk) * 4096
                    t0 = time.monotonic()
                    buf = memoryview(bufs[k % 64])
                    k += 1
                    f = h.read(off, buf) if rw == "randread" else h.write(off, buf, False)
                    f.add_done_callback(lambda f, t0=t0: done(f, t0))
                for _ in range(64):
                    sem.acquire(timeout=60)
                r = {"iops": stats["n"] / self.args.runtime,
                     "lat_us": stats["lat"] / max(1, stats["n"]) * 1e6}
                label = "rbd handler API, no kernel (Python)"
                print(f"  {label:40} {rw:9} {r['iops']:9.0f} IOPS {r['lat_us']:9.1f} us",
                      flush=True)
                self.rows[rw].append((label, r))
        finally:
            h.close()
            os.sched_setaffinity(0, set(range(os.cpu_count())))

    def median_rounds(self, rw, rows):
        """Rounds -> one row per target: the median IOPS and latency, the per-round IOPS kept.
        Prints every target's per-round ratio to the first target: the host's load drifts
        over minutes, and targets measured next to each other in one round see nearly the same
        host, so the spread of these ratios says how far a single round could be trusted."""
        import statistics
        by: dict[str, list[dict]] = {}
        for label, r in rows:
            by.setdefault(label, []).append(r)
        first = next(iter(by), None)
        out = []
        for label, rs in by.items():
            iops = [r["iops"] for r in rs]
            agg = {"iops": statistics.median(iops),
                   "lat_us": statistics.median(r["lat_us"] for r in rs), "rounds_iops": iops}
            if label != first and len(rs) == len(by[first]):
                ratios = [b["iops"] / a["iops"] for a, b in zip(by[first], rs)]
                agg["rounds_ratio"] = ratios
                print(f"  {rw:9} {label:40} per round / {first}: "
                      + " ".join(f"{x:.2f}" for x in ratios)
                      + f"  (median {statistics.median(ratios):.2f})", flush=True)
            out.append((label, agg))
        return out

    # ---- main ---------------------------------------------------------------------------------
    def main(self):
        mod = cluster_module()
        missing = mod.missing_binaries()
        if missing:
            raise SystemExit("Ceph is not installed: " + ", ".join(missing))
        subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True)
        # krbd and nbd. Loaded here, in this order: the harness' single "modprobe -a" fails on
        # libcrc32c in the TCG guest unless crc32c_generic is loaded first.
        for m in ("crc32c_generic", "libcrc32c", "rbd", "nbd", "target_core_user", "tcm_loop",
                  "sd_mod"):
            subprocess.run(["modprobe", m], capture_output=True)
        d = tempfile.mkdtemp(prefix="ceph-bench-", dir="/tmp")
        c = mod.Cluster(d, objectstore="memstore", store_bytes=self.args.size * 3)
        t0 = time.monotonic()
        c.up(timeout=240)
        try:
            self.info = c.info()
            self.image = "bench"
            c.create_image(self.image, self.args.size)
            print(f"cluster up in {time.monotonic() - t0:.0f}s; filling {self.args.size >> 20} MiB",
                  flush=True)
            run("rbd", "bench", *self.ceph_args(), "--io-type", "write", "--io-size", "4M",
                "--io-threads", "8", "--io-pattern", "seq", "--io-total", str(self.args.size),
                f"{self.info['pool']}/{self.image}", timeout=900)
            tmp = tempfile.mkdtemp(prefix="rbd-bench-")
            for k in range(self.args.rounds):
                if self.args.rounds > 1:
                    print(f"round {k + 1} of {self.args.rounds}", flush=True)
                for name in self.args.targets.split(","):
                    {"ublk": lambda: self.ublk(tmp), "ublk-py": lambda: self.ublk(tmp, False),
                     "ublk2": lambda: self.ublk(tmp, queues=2),
                     "krbd": self.krbd, "nbd": self.nbd, "tcmu": self.tcmu,
                     "librbd": self.rbd_bench, "api": self.api}[name]()
        finally:
            c.down(purge=True)
        if self.args.rounds > 1:
            self.rows = {rw: self.median_rounds(rw, rows) for rw, rows in self.rows.items()}
        ref = self.rows["randread"][0][0] if self.rows["randread"] else None
        cache = "librbd cache on (writearound)" if self.args.cache else "rbd_cache=false"
        cache = ", ".join([cache] + self.args.librbd_opt)
        for rw in ("randread", "randwrite"):
            if self.rows[rw]:
                print()
                print(table(f"4k {rw} QD64, memstore OSD on the VM's loopback, {cache}",
                            self.rows[rw], ref))
        for s in self.skipped:
            print("skipped:", s)
        if self.args.json:
            targets: dict = {}
            for rw, rows in self.rows.items():
                for name, r in rows:
                    targets.setdefault(name, {})[rw] = r
            save_results(self.args.json, "rbd", f"4k QD64, memstore OSD on the VM's loopback, {cache}",
                         ref, targets, skipped=self.skipped)


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=int, default=15, help="fio seconds per run")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every target this many times, in turn; report medians")
    ap.add_argument("--size", type=int, default=256 * MiB, help="image bytes")
    ap.add_argument("--queues", type=int, default=1, help="ublk queues of the rbd device")
    ap.add_argument("--cache", action="store_true", help="keep librbd's default cache")
    ap.add_argument("--bench-total", type=int, default=64 * MiB,
                    help="bytes per 'rbd bench' run (it has no time limit)")
    ap.add_argument("--targets", default="librbd,api,ublk,ublk-py,krbd,nbd,tcmu",
                    help="librbd (rbd bench), api (handler API, Python), ublk (handler, native "
                         "C path), ublk2 (the same with 2 queues), ublk-py (handler, native: false), krbd, nbd (rbd-nbd), "
                         "tcmu (tcmu-runner's rbd handler over tcm_loop)")
    # Both vCPUs by default: the runs are bound by guest CPU, and krbd's client work (kernel
    # threads, softirqs) runs on both; pinning only the userspace servers to one vCPU halved
    # what librbd could use (docs/performance.rst).
    ap.add_argument("--server-cpus", default=f"{SERVER_CPU},{FIO_CPU}",
                    help="CPU list (taskset) for the userspace servers (runner, rbd-nbd) and "
                         "all their threads, librbd's included (default: both vCPUs)")
    ap.add_argument("--librbd-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="a Ceph option for every librbd-based target alike (handler, rbd-nbd, "
                         "rbd bench, api), e.g. rbd_non_blocking_aio=false; repeatable")
    ap.add_argument("--threads", action="store_true",
                    help="print which guest threads (by role) used the CPU in each fio run, "
                         "in microseconds per request (not for rbd bench: its threads are "
                         "gone before they can be counted)")
    ap.add_argument("--perf", metavar="DIR",
                    help="perf record -a during every fio run (perturbs it a little)")
    ap.add_argument("--profile", metavar="DIR",
                    help="py-spy record the runner during the ublk targets (perturbs them)")
    ap.add_argument("--json")
    return ap.parse_args()


if __name__ == "__main__":
    Bench(parse()).main()
