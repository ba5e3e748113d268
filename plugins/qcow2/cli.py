"""``ublk-runner qcow2 create|info|check``: the qcow2 plugin's own subcommands, added through the
``ublk_runner_add_commands`` hook like any third-party plugin's.  qemu-img stays the oracle; these
are for machines without it and for scripts that already speak ublk-runner."""
from __future__ import annotations

import json
import os
import sys

from .check import EXIT_FAILED, check, exit_code
from .engine import Qcow2Error, Qcow2Image, create


def add_commands(subparsers) -> None:
    about = "create, inspect and check qcow2 images (qemu-img stays the reference)"
    q = subparsers.add_parser("qcow2", help=about, description=about)
    qsub = q.add_subparsers(dest="qcow2_command", required=True, metavar="SUBCOMMAND")
    p = qsub.add_parser("create", help="create an empty image")
    p.set_defaults(func=cmd_create)
    p.add_argument("path")
    p.add_argument("size", help="virtual size, e.g. 10G")
    p.add_argument("--cluster-size", default="64K", help="512 to 2M, a power of two (default 64K)")
    p.add_argument("--compat", choices=["0.10", "1.1"], default="1.1", help="qcow2 version 2 (0.10) or 3 (1.1)")
    p.add_argument("-b", "--backing", help="backing file (relative paths: to the new image's directory)")
    p.add_argument("-F", "--backing-format", choices=["raw", "qcow2"], help="format of the backing file")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p = qsub.add_parser("info", help="header facts: size, cluster size, version, backing file, snapshots")
    p.set_defaults(func=cmd_info)
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = qsub.add_parser("check", help="refcounts against references; exit 0 clean, 2 corrupt, 3 leaks only, 1 failed")
    p.set_defaults(func=cmd_check)
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_create(args) -> int:
    from runner.handler import parse_size
    if os.path.exists(args.path) and not args.force:
        raise RuntimeError(f"{args.path} exists (use --force to overwrite)")
    try:
        size, cs = parse_size(args.size), parse_size(args.cluster_size)
    except ValueError as e:
        raise RuntimeError(str(e)) from e
    try:
        create(args.path, size, cluster_size=cs, version=2 if args.compat == "0.10" else 3,
                     backing=args.backing, backing_format=args.backing_format)
    except (Qcow2Error, OSError) as e:
        raise RuntimeError(str(e)) from e
    return 0


def cmd_info(args) -> int:
    try:
        with Qcow2Image.open(args.path, readonly=True, cache_bytes=1 << 20) as q:
            info = {
                "filename": args.path, "format": "qcow2", "virtual-size": q.size,
                "actual-size": os.stat(args.path).st_blocks * 512, "cluster-size": q.cluster_size,
                "compat": "1.1" if q.version >= 3 else "0.10", "refcount-bits": q.refcount_bits,
                "compression-type": "zstd" if q.compression_type == 1 else "zlib",
                "backing-filename": q.backing_file, "backing-filename-format": q.backing_format,
                "snapshots": [{"id": i, "name": n, "vm-size": s} for i, n, s in q.snapshots],
            }
    except (Qcow2Error, OSError) as e:
        raise RuntimeError(str(e)) from e
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            if v not in (None, []):
                print(f"{k}: {v}")
    return 0


def cmd_check(args) -> int:
    try:
        res = check(args.path)
    except (Qcow2Error, OSError) as e:
        print(f"ublk-runner: cannot check {args.path}: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({"filename": args.path, "corruptions": res["corruptions"], "leaks": res["leaks"],
                          "errors": res["errors"], "image-end-offset": res["image_end_offset"]}, indent=2))
    else:
        for m in res["errors"]:
            print(f"ERROR {m}")
        if res["leaks"]:
            print(f"{res['leaks']} leaked clusters were found on the image.")
        if res["corruptions"]:
            print(f"{res['corruptions']} errors were found on the image.")
        if not res["leaks"] and not res["corruptions"]:
            print("No errors were found on the image.")
    return exit_code(res)
