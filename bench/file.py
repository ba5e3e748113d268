"""The same file on tmpfs through: the file handler's native path and its Python mode, kernel
loop with direct IO, and nbdkit's file and Python plugins over /dev/nbd0.  fio 4k randread and
randwrite, io_uring, direct, iodepth 64, one job pinned away from the servers.  In the VM:

    UBLK_VM_MODULES="ublk_drv null_blk loop nbd" tests/vm/run .venv/bin/python bench/file.py
"""
import argparse
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SERVER_CPU, both, over_nbd, runner_device, save_results, table  # noqa: E402

from runner.config import DeviceConfig  # noqa: E402
from runner.plugins import load_plugins  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def served(plugins, path, size, mode, runtime, user_copy="auto"):
    cfg = DeviceConfig(name=f"bench-{mode}", handler="file", size=size, queues=1, depth=128,
                       user_copy=user_copy, options={"path": path, "direct": False, "mode": mode, "create": True})
    return runner_device(cfg, plugins.registry["file"], plugins, runtime)


def nbdkit(plugin_args, runtime, nbd_dev):
    sock = f"/run/nbdkit-bench-{os.path.basename(nbd_dev)}.sock"
    return over_nbd(["nbdkit", "-f", "-U", sock, "--exit-with-parent", *plugin_args], sock, runtime, nbd_dev)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--size", type=int, default=1 << 30)
    ap.add_argument("--json")
    args = ap.parse_args()
    path = "/tmp/bench-file.img"
    with open(path, "wb") as f:
        f.truncate(args.size)
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={args.size >> 20}", "conv=notrunc"],
                   check=True, capture_output=True)
    os.sched_setaffinity(0, {SERVER_CPU})   # queue threads inherit it; fio runs on FIO_CPU
    plugins = load_plugins()
    rows = {}
    loopdev = subprocess.run(["losetup", "--direct-io=on", "-f", "--show", path], check=True,
                             capture_output=True, text=True).stdout.strip()
    try:
        rows["kernel loop, direct-io"] = both(loopdev, args.runtime)
    finally:
        subprocess.run(["losetup", "-d", loopdev])
    rows["ublk-runner file, native (io_uring in the core)"] = served(plugins, path, args.size, "native", args.runtime)
    rows["ublk-runner file, native, buffer mode"] = served(plugins, path, args.size, "native", args.runtime, user_copy=False)
    rows["ublk-runner file, Python mode"] = served(plugins, path, args.size, "python", args.runtime)
    if shutil.which("nbdkit") and os.path.exists("/dev/nbd0"):
        rows["nbdkit file plugin (C) over nbd"] = nbdkit(["file", f"file={path}"], args.runtime, "/dev/nbd0")
        rows["nbdkit python plugin over nbd"] = nbdkit(
            ["python", os.path.join(HERE, "nbdkit_file.py"), f"file={path}"], args.runtime, "/dev/nbd1")
    else:
        print("nbdkit or /dev/nbd0 missing: skipping the nbdkit peers (scripts/setup --bench; module nbd)")
    for rw in ("randread", "randwrite"):
        print(table(f"4k {rw} QD64, file on tmpfs", [(k, v[rw]) for k, v in rows.items()],
                    "kernel loop, direct-io"))
        print()
    if args.json:
        save_results(args.json, "file", "4k QD64, 1 GiB file on tmpfs", "kernel loop, direct-io", rows)


if __name__ == "__main__":
    os.environ.setdefault("UBLK_RUNNER_DISABLE_PLUGIN_AUTOLOAD", "0")
    main()
