"""Null targets side by side: the core's native null path, a null completed by Python in
batches, and the kernel's null_blk.  fio 4k randread, io_uring, direct, iodepth 64, one job
pinned away from the queue thread.  Run in the VM:

    tests/vm/run .venv/bin/python bench/null.py [--runtime 10] [--json FILE]
"""
import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ServedDevice, fio, save_results, table  # noqa: E402

SIZE = 1 << 30


def python_null(q, reqs):
    complete = q.complete
    for r in reqs:
        complete(r, r.length)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not os.path.exists("/dev/nullb0"):
        subprocess.run(["modprobe", "null_blk"], check=True)
    rows = []
    rows.append(("kernel null_blk", fio("/dev/nullb0", runtime=args.runtime)))
    for pollable in (True, False):
        ring = "pollable ring" if pollable else "DEFER_TASKRUN ring"
        for label, kw in ((f"ublk-runner native null (core only), {ring}", {"native": "null"}),
                          (f"ublk-runner null completed by Python, {ring}", {"handle": python_null})):
            served = ServedDevice(SIZE, pollable=pollable, **kw)
            with served as dev:
                before = served.counters()
                r = fio(dev.block_path, runtime=args.runtime)
                d = {k: v - before[k] for k, v in served.counters().items()}
            # Under TCG a sleep and wake-up of the queue thread costs more than serving a null
            # request: how many requests each sleep covers decides the ranking.
            r["waits_per_req"] = d["waits"] / max(1, d["requests"])
            batches = (f", {d['requests'] / d['batches']:.1f} requests per batch to Python"
                       if d["batches"] else "")
            print(f"{label}: {r['iops']:.0f} IOPS, {r['waits_per_req']:.3f} sleeps of the queue "
                  f"thread per request{batches}", flush=True)
            rows.append((label, r))
    rows.append(("kernel null_blk (again, to see drift)", fio("/dev/nullb0", runtime=args.runtime)))
    print(table("4k randread QD64, 1 queue", rows, "kernel null_blk"))
    if args.json:
        save_results(args.json, "null", "4k randread QD64, 1 queue", "kernel null_blk",
                     {name: {"randread": r} for name, r in rows})


if __name__ == "__main__":
    main()
