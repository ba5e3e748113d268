"""``ublk-runner`` command line."""
from __future__ import annotations

import argparse
import json
import sys

from . import ublk


def cmd_features(args) -> int:
    feats = ublk.get_features()
    if args.json:
        print(json.dumps({"flags": feats, "names": ublk.flag_names(feats)}))
    else:
        print(f"{feats:#x} {' '.join(ublk.flag_names(feats))}")
    return 0


def cmd_kernel_list(args) -> int:
    devs = ublk.list_devices()
    if args.json:
        print(json.dumps([d.as_dict() for d in devs], indent=2))
    else:
        for d in devs:
            print(f"{d.dev_id:4} {d.state:9} queues={d.nr_queues} depth={d.depth} pid={d.pid} "
                  f"{'ours ' if d.ours else ''}{' '.join(ublk.flag_names(d.flags))}")
    return 0


def cmd_cleanup(args) -> int:
    deleted = ublk.cleanup_dead(only_ours=not args.all, include_quiesced=args.include_quiesced)
    for dev_id in deleted:
        print(f"deleted ublk device {dev_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ublk-runner", description="Userspace block devices on ublk.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("features", help="the ublk features the running kernel supports")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_features)
    p = sub.add_parser("kernel-list", help="every ublk device the kernel has, with its state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_kernel_list)
    p = sub.add_parser("cleanup", help="delete devices whose server process is gone (e.g. after SIGKILL)")
    p.add_argument("--all", action="store_true", help="also devices not created by ublk-runner")
    p.add_argument("--include-quiesced", action="store_true",
                   help="also QUIESCED devices that are waiting for user recovery")
    p.set_defaults(func=cmd_cleanup)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ublk.UblkError as e:
        print(f"ublk-runner: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
