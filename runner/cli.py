"""``ublk-runner`` command line: run the runner, manage a running one, inspect the kernel."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from . import ublk

DEFAULT_SOCKET = "/run/ublk-runner/control.sock"


def _print(obj, as_json: bool, text) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
    else:
        text(obj)


# ---- the runner
def cmd_run(args) -> int:
    from .daemon import Runner, setup_logging
    from .config import load_global
    from .errors import ConfigError
    try:
        g = load_global(args.config)
        setup_logging(args.log_level or g.log_level, g.log_target)
        if args.worker:
            from .supervisor import become_worker
            become_worker()
        runner = Runner(args.config, extra_plugins=args.plugin, socket_path=args.socket,
                        state_dir=args.state_dir, only=args.only, worker=args.worker)
    except ConfigError as e:
        print(f"ublk-runner: {e}", file=sys.stderr)
        return 2
    return runner.run()


def cmd_check_config(args) -> int:
    from .config import load_config, load_global
    from .errors import ConfigError
    from .plugins import load_plugins
    try:
        g = load_global(args.config)
        plugins = load_plugins(g.plugins.autoload, g.plugins.block, args.plugin)
        cfg = load_config(args.config, plugins.registry)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    for failure in plugins.errors:
        print(f"warning: {failure}", file=sys.stderr)
    print(f"{args.config}: OK, {len(cfg.devices)} device(s): "
          + ", ".join(f"{d.name} ({d.handler})" for d in cfg.devices))
    return 0


def cmd_plugins(args) -> int:
    from .plugins import load_plugins
    plugins = load_plugins(extra=args.plugin)
    infos = [dataclasses.asdict(p) for p in plugins.list_plugins()]

    def text(rows):
        for p in rows:
            print(f"{p['name']:12} {p.get('distribution') or '-'} {p.get('version') or ''}  "
                  f"handlers: {', '.join(p.get('handlers') or ()) or '-'}")
        for f in plugins.errors:
            print(f"error: {f}", file=sys.stderr)
    _print(infos, args.json, text)
    return 0


# ---- a running runner, through its control socket
def _request(args, req):
    from .daemon import control_request
    return control_request(args.socket or DEFAULT_SOCKET, req)


def cmd_list(args) -> int:
    res = _request(args, {"cmd": "list"})

    def text(r):
        for d in r["devices"]:
            print(f"{d['name']:16} {d['block'] or '-':14} {d['state']:9} {d['handler']:10} {d['mode']:12} "
                  f"size={d['size']} queues={d['queues']}")
        for name, why in r["failed"].items():
            print(f"{name:16} FAILED: {why}")
    _print(res, args.json, text)
    return 0


def cmd_stats(args) -> int:
    res = _request(args, {"cmd": "stats", "name": args.name})

    def text(r):
        for name, st in r.items():
            t = st["total"]
            ops = " ".join(f"{k}={v}" for k, v in t["ops"].items() if v)
            print(f"{name}: {ops or 'no IO'}; bytes read={t['bytes'].get('read', 0)} "
                  f"written={t['bytes'].get('write', 0)}; errors={t['errors']} in_flight={t['in_flight']}")
    _print(res, args.json, text)
    return 0


def _option_value(text: str):
    import yaml
    return yaml.safe_load(text)


def cmd_add(args) -> int:
    dev = {"name": args.name, "handler": args.handler}
    for key in ("size", "queues", "depth", "id"):
        if getattr(args, key) is not None:
            dev[key] = getattr(args, key)
    if args.read_only:
        dev["read_only"] = True
    opts = {}
    for item in args.option:
        k, sep, v = item.partition("=")
        if not sep:
            print(f"ublk-runner: --option {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        opts[k] = _option_value(v)
    if opts:
        dev["options"] = opts
    res = _request(args, {"cmd": "add", "device": dev})
    _print(res, args.json, lambda d: print(f"{d['name']}: {d['block']}"))
    return 0


def cmd_del(args) -> int:
    res = _request(args, {"cmd": "del", "name": args.name})
    _print(res, args.json, lambda r: print(f"deleted {r['deleted']}"))
    return 0


# ---- the kernel, directly
def cmd_features(args) -> int:
    feats = ublk.get_features()
    _print({"flags": feats, "names": ublk.flag_names(feats)}, args.json,
           lambda r: print(f"{r['flags']:#x} {' '.join(r['names'])}"))
    return 0


def cmd_kernel_list(args) -> int:
    devs = [d.as_dict() for d in ublk.list_devices()]

    def text(rows):
        for d in rows:
            print(f"{d['id']:4} {d['state']:9} queues={d['queues']} depth={d['depth']} pid={d['pid']} "
                  f"{'ours ' if d['ours'] else ''}{' '.join(d['flags'])}")
    _print(devs, args.json, text)
    return 0


def cmd_cleanup(args) -> int:
    deleted = ublk.cleanup_dead(only_ours=not args.all, include_quiesced=args.include_quiesced)
    for dev_id in deleted:
        print(f"deleted ublk device {dev_id}")
    return 0


def _add_plugin_commands(sub, plugins) -> None:
    """Commands that plugins add (``ublk_runner_add_commands``); a plugin that fails is named
    on stderr and the rest of the command line still works."""
    if plugins is None:
        from .plugins import load_plugins
        plugins = load_plugins()
    for plugin, exc in plugins.call_each("ublk_runner_add_commands", subparsers=sub):
        print(f"ublk-runner: warning: plugin {plugin} could not add its commands: {exc}", file=sys.stderr)


def build_parser(plugins=None, plugin_commands: bool = True) -> argparse.ArgumentParser:
    """The command line; ``plugins`` (a loaded :class:`runner.plugins.Plugins`) adds its
    commands, by default the autoloaded plugins'; ``plugin_commands=False`` builds the
    built-in commands only, without loading any plugin."""
    parser = argparse.ArgumentParser(prog="ublk-runner", description="Userspace block devices on Linux's ublk driver.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help, json_flag=False, socket_flag=False, plugin_flag=False):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        if socket_flag:
            p.add_argument("--socket", help=f"control socket of the runner (default {DEFAULT_SOCKET})")
        if plugin_flag:
            p.add_argument("--plugin", action="append", default=[], metavar="NAME",
                           help="also load this plugin (entry-point or module name); repeatable")
        return p

    p = add("run", cmd_run, "serve every device of a configuration file", socket_flag=True, plugin_flag=True)
    p.add_argument("-c", "--config", required=True, help="YAML configuration file")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--state-dir", help="where the device table for recovery lives (default: the config's "
                   "runner.state_dir, /run/ublk-runner)")
    p.add_argument("--only", metavar="NAME", help="serve only this device of the configuration "
                   "(what an isolated device's worker process runs)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p = add("check-config", cmd_check_config, "validate a configuration file without touching the kernel",
            plugin_flag=True)
    p.add_argument("config", help="YAML configuration file")
    add("plugins", cmd_plugins, "list discovered handler plugins with distribution and version",
        json_flag=True, plugin_flag=True)
    add("list", cmd_list, "devices of the running runner", json_flag=True, socket_flag=True)
    p = add("stats", cmd_stats, "IO counters of the running runner's devices", json_flag=True, socket_flag=True)
    p.add_argument("name", nargs="?", help="one device (default: all)")
    p = add("add", cmd_add, "add a device to the running runner", json_flag=True, socket_flag=True)
    p.add_argument("name")
    p.add_argument("--handler", required=True)
    p.add_argument("--size")
    p.add_argument("--queues", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--id", type=int)
    p.add_argument("--read-only", action="store_true")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a handler option (VALUE is read as YAML); repeatable")
    p = add("del", cmd_del, "stop and delete a device of the running runner", json_flag=True, socket_flag=True)
    p.add_argument("name")
    add("features", cmd_features, "ublk features of the running kernel", json_flag=True)
    add("kernel-list", cmd_kernel_list, "every ublk device the kernel has, with its state", json_flag=True)
    p = add("cleanup", cmd_cleanup, "delete ublk devices whose server process is gone (e.g. after SIGKILL)")
    p.add_argument("--all", action="store_true", help="also devices not created by ublk-runner")
    p.add_argument("--include-quiesced", action="store_true",
                   help="also QUIESCED devices that are waiting for user recovery")
    if plugin_commands:
        _add_plugin_commands(sub, plugins)
    parser.commands = sub.choices  # name -> subparser, for _parser_for
    return parser


def _parser_for(argv: list[str]) -> argparse.ArgumentParser:
    """Loading plugins costs time (imports, entry points), and ``run`` loads them again with
    the configuration's autoload/block lists: only a command that is not built in (or no
    command, for the full help) needs the plugins' commands."""
    builtin = build_parser(plugin_commands=False)
    first = next((a for a in argv if not a.startswith("-")), None)
    return builtin if first in builtin.commands else build_parser()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser_for(argv).parse_args(argv)
    try:
        return args.func(args)
    except (ublk.UblkError, RuntimeError) as e:
        print(f"ublk-runner: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
