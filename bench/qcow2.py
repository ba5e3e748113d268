"""One fully allocated qcow2 image on tmpfs through: the qcow2 handler with its fast path (reads and
in-place writes forwarded to the native core), the same handler on the Python path only,
qemu-nbd over /dev/nbd0, and tcmu-runner's qcow handler behind LIO's tcm_loop (when installed).
fio 4k randread and randwrite, io_uring, direct, iodepth 64, one job pinned away from the
servers.  In the VM (peers: scripts/setup --bench):

    UBLK_VM_MODULES="ublk_drv nbd target_core_user tcm_loop sd_mod" tests/vm/run .venv/bin/python bench/qcow2.py
"""
import argparse
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SERVER_CPU, both, over_nbd, runner_device, save_results, table, tcmu_disk  # noqa: E402

from runner.config import DeviceConfig  # noqa: E402
from runner.handler import validate_options  # noqa: E402
from runner.plugins import load_plugins  # noqa: E402

REFERENCE = "qemu-nbd over nbd"


def served(plugins, path, forward, runtime):
    cls = plugins.registry["qcow2"]
    options, errors = validate_options(cls.options_schema, {"path": path, "forward": forward}, "qcow2")
    assert not errors, errors
    cfg = DeviceConfig(name=f"bench-qcow2-{'fast' if forward else 'python'}", handler="qcow2", queues=1,
                       depth=128, options=options)

    def forwarded_share(srv, res):
        total = srv.stats()["total"]
        res["forwarded_share"] = total["forwarded"] / max(1, total["ops"].get("read", 0) + total["ops"].get("write", 0))
    return runner_device(cfg, cls, plugins, runtime, forwarded_share)


def qemu_nbd(path, runtime, nbd_dev="/dev/nbd0"):
    sock = "/run/qemu-nbd-bench.sock"
    # qemu-nbd's defaults (writeback cache, thread-pool AIO), pinned like our queue thread
    return over_nbd(["qemu-nbd", "-f", "qcow2", "-k", sock, path], sock, runtime, nbd_dev)


def tcmu_qcow(path, size, runtime):
    with tcmu_disk(f"qcow/{path}", size, "qcowbench", str(SERVER_CPU)) as disk:
        return both(disk, runtime)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--size", type=int, default=1 << 30)
    ap.add_argument("--json")
    ap.add_argument("--skip", action="append", default=[], help="fast, python, qemu-nbd or tcmu")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each target keeps its best")
    args = ap.parse_args()
    path = "/tmp/bench.qcow2"     # /tmp is tmpfs in the VM
    # fully allocated: every L2 entry points at a data cluster (falloc'ed, so tmpfs holds real pages)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc", path,
                    str(args.size)], check=True)
    os.sched_setaffinity(0, {SERVER_CPU})   # queue threads inherit it; fio runs on FIO_CPU
    plugins = load_plugins()
    targets = []
    if "fast" not in args.skip:
        targets.append(("ublk-runner qcow2, fast path (core IO)", lambda: served(plugins, path, True, args.runtime)))
    if "python" not in args.skip:
        targets.append(("ublk-runner qcow2, Python path only", lambda: served(plugins, path, False, args.runtime)))
    if "qemu-nbd" not in args.skip and shutil.which("qemu-nbd") and os.path.exists("/dev/nbd0"):
        targets.append((REFERENCE, lambda: qemu_nbd(path, args.runtime)))
    else:
        print("qemu-nbd or /dev/nbd0 missing: skipping it (scripts/setup --bench; module nbd)")
    if "tcmu" not in args.skip and shutil.which("tcmu-runner"):
        targets.append(("tcmu-runner qcow handler, tcm_loop", lambda: tcmu_qcow(path, args.size, args.runtime)))
    # Rounds interleave the targets, so a burst of load on the shared host hits them alike; each
    # target keeps its best round.
    runs: dict = {}
    for rnd in range(args.rounds):
        for name, run in targets:
            try:
                res = run()
            except Exception as e:  # noqa: BLE001 - a peer that cannot be set up is skipped, loudly
                if name.startswith("ublk-runner"):
                    raise
                print(f"{name}: skipped ({e})")
                targets = [t for t in targets if t[0] != name]
                continue
            runs.setdefault(name, []).append(res)
    rows = {}
    for name, rs in runs.items():
        rows[name] = {rw: max((r[rw] for r in rs), key=lambda x: x["iops"]) for rw in ("randread", "randwrite")}
        rows[name]["rounds"] = rs
        if "forwarded_share" in rs[0]:
            rows[name]["forwarded_share"] = min(r["forwarded_share"] for r in rs)
    for k, v in rows.items():
        if "forwarded_share" in v:
            print(f"{k}: {v['forwarded_share']:.0%} of reads and writes forwarded")
    ref = REFERENCE if REFERENCE in rows else next(iter(rows))
    for rw in ("randread", "randwrite"):
        print(table(f"4k {rw} QD64, fully allocated {args.size >> 20} MiB qcow2 on tmpfs, best of {args.rounds}",
                    [(k, v[rw]) for k, v in rows.items()], ref))
        print()
    if args.json:
        save_results(args.json, "qcow2", f"4k QD64, fully allocated {args.size >> 20} MiB qcow2 on tmpfs, "
                     f"best of {args.rounds}", ref, rows)


if __name__ == "__main__":
    main()
