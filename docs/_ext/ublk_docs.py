"""Sphinx directives that render reference material straight from the code.

``.. ublk-config-schema:: global`` / ``device``
    The YAML keys of the ``runner:`` section or of one ``devices:`` item:
    names and defaults from the dataclasses in :mod:`runner.config`, types
    and bounds from the validator's field table (``_Validator.DEVICE_OPTS``)
    and the module's constants. The prose column lives in this file; a key
    that the code accepts but this file does not describe (or the other way
    round) is a build warning, i.e. an error under ``-W``.

``.. ublk-builtin-handlers::``
    Every handler registered by the ``ublk-runner`` distribution's own entry
    points (found through the real plugin loader), with its
    ``options_schema`` as a table.

``.. ublk-cli::``
    ``ublk-runner --help`` and the help of every subcommand, from
    :func:`runner.cli.build_parser`.

``.. ublk-kernel-features::``
    The UBLK_F_* flags :mod:`runner.ublk` knows, with the kernel release
    that brought each and whether the runner uses it. Every flag in
    ``runner.ublk.FEATURE_NAMES`` must have a row here.
"""
from __future__ import annotations

import dataclasses
import inspect
import os

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- helpers

def _cell(text: str) -> str:
    return " ".join(str(text).split()) or "--"


def _list_table(header: list[str], rows: list[list[str]], widths: str | None = None) -> list[str]:
    out = [".. list-table::", "   :header-rows: 1"]
    if widths:
        out.append(f"   :widths: {widths}")
    out.append("")
    for row in [header] + rows:
        first = True
        for c in row:
            out.append(("   * - " if first else "     - ") + _cell(c))
            first = False
    out.append("")
    return out


class _RstDirective(SphinxDirective):
    """Base: subclasses produce RST lines, which are parsed in place."""

    def lines(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self) -> list[nodes.Node]:
        try:
            lines = self.lines()
        except Exception as e:  # noqa: BLE001 - becomes a build error under -W
            log.warning("%s: %s: %s", self.name, type(e).__name__, e, location=self.get_location())
            return []
        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source=f"<{self.name}>"), node)
        return node.children


def _fmt_default(value) -> str:
    from runner.handler import format_size

    if value is None:
        return "``null``"
    if isinstance(value, bool):
        return f"``{str(value).lower()}``"
    if isinstance(value, (list, tuple)):
        return "``[" + ", ".join(str(v) for v in value) + "]``"
    if isinstance(value, int) and value >= 4096 and format_size(value) != str(value):
        return f"``{format_size(value)}``"
    if isinstance(value, float) and value.is_integer():
        return f"``{int(value)}``"
    return f"``{value}``"


def _opt_constraints(opt) -> str:
    """Bounds and choices of a runner.handler.Opt, in words."""
    from runner.handler import Size, format_size

    base = opt.item_type or opt.type
    fmt = format_size if base is Size else str
    parts = []
    if opt.choices is not None:
        parts.append("one of " + ", ".join(f"``{fmt(c)}``" for c in opt.choices))
    if opt.min is not None and opt.max is not None:
        parts.append(f"{fmt(opt.min)} .. {fmt(opt.max)}")
    elif opt.min is not None:
        parts.append(f">= {fmt(opt.min)}")
    elif opt.max is not None:
        parts.append(f"<= {fmt(opt.max)}")
    return "; ".join(parts)


# ---------------------------------------------------------------- config schema

def _global_descriptions():
    from runner import config as c

    return {
        "log_level": ("a string", f"one of {', '.join(f'``{x}``' for x in c.LOG_LEVELS)} (case-insensitive)",
                      "Least severe message that is logged. ``ublk-runner run --log-level`` overrides it."),
        "log_target": ("a string", "``stderr``, ``journald`` or an absolute file path",
                       "Where log records go. ``journald`` needs the ``python3-systemd`` package and "
                       "falls back to stderr (with a warning) without it. See :doc:`/operations`."),
        "control_socket": ("a string", "absolute path",
                           "Unix socket for ``ublk-runner list/stats/add/del``. Created mode 0600 (root only). "
                           "``--socket`` overrides it."),
        "state_dir": ("a string", "absolute path",
                      "Directory of the device table (``devices.json``, replaced atomically) that lets a "
                      "restarted runner recover its QUIESCED devices. ``--state-dir`` overrides it. "
                      "See :ref:`recovery`."),
        "metrics.prometheus_port": ("an integer or ``null``", "1 .. 65535",
                                    "Port of the Prometheus ``/metrics`` exporter (needs ``prometheus-client``, "
                                    "the ``metrics`` extra); ``null``: no exporter. See :doc:`/operations`."),
        "metrics.prometheus_addr": ("a string", "not empty", "Address the exporter listens on."),
        "plugins.autoload": ("a boolean", "",
                             "Load every installed plugin of the entry-point group ``ublk_runner``. "
                             f"The environment variable ``{_env_var()}=1`` forces it off. Plugins named "
                             "with ``--plugin`` are loaded either way."),
        "plugins.block": ("a list of strings", "",
                          "Plugin (entry-point) names never to load, even when named with ``--plugin``."),
    }


def _env_var() -> str:
    from runner.plugins import ENV_DISABLE_AUTOLOAD

    return ENV_DISABLE_AUTOLOAD


def _device_descriptions():
    return {
        "name": ("a string", "1-64 characters from ``A-Z a-z 0-9 _ . -``; unique; not ``.`` or ``..``",
                 "The device's name in logs, ``ublk-runner list`` and the control socket. Required."),
        "handler": ("a string", "a registered handler name",
                    "Which handler serves the device (``ublk-runner plugins`` lists them). Required. "
                    "Quote ``\"null\"``: a bare ``null`` is YAML's empty value."),
        "size": ("a size", "> 0, a multiple of ``block_size``",
                 "Device size in bytes. Optional when the handler can tell (``file`` takes the file's size); "
                 "handlers with ``size_required`` refuse a device without it."),
        "id": ("an integer", "unique among devices",
               "Fixed ublk device id, so the disk is ``/dev/ublkb<id>``; ``-1`` lets the kernel pick one."),
        "queues": ("an integer", "", "Number of hardware queues, each served by its own thread (an asyncio handler "
                   "with ``thread_model: serialize``: one thread for all). The kernel caps it at the number "
                   "of CPUs; asking for more fails the device."),
        "depth": ("an integer", "", "Requests in flight per queue (tags)."),
        "block_size": ("a size", "", "Logical block size; every request offset and length is a multiple of it."),
        "physical_block_size": ("a size", "a power of two >= ``block_size``",
                                "Physical block size advertised to the kernel (also ``io_min``)."),
        "max_io_size": ("a size", "a multiple of 4K",
                        "Largest single request; the kernel splits bigger ones."),
        "read_only": ("a boolean", "", "Export a read-only disk: writes never reach the handler."),
        "recovery": ("a string", "",
                     "What happens when the runner dies. ``requeue`` (USER_RECOVERY): the kernel keeps the "
                     "device and holds new IO until a restarted runner takes it over; requests in flight at "
                     "the crash fail. ``reissue`` (USER_RECOVERY_REISSUE): those are given again to the new "
                     "runner. ``none``: the disk disappears with the runner. ``auto``: ``reissue`` if the "
                     "handler declares ``idempotent_writes`` (all built-in handlers do), else ``requeue``. "
                     "See :ref:`recovery`."),
        "recovery_grace": ("a number", ">= 0",
                           "Seconds a recovering device waits for its handler to reopen the backend (retried "
                           "every second). After that the device is stopped and deleted, so IO waiting on it "
                           "fails instead of hanging."),
        "request_timeout": ("a number", "> 0",
                            "Seconds: each request's deadline. A request the handler has not finished by then "
                            "is failed with ETIMEDOUT (the reader sees an IO error) and logged with the handler "
                            "and the request; the device goes on serving. Privileged ublk devices have no "
                            "kernel request timeout on 6.12, so this is the only one. Device start and control "
                            "commands wait the larger of this and 30 s."),
        "isolate": ("a boolean", "",
                    "Serve the device from its own worker process, restarted (and the device recovered) "
                    "by the runner when it dies; a handler that crashes or deadlocks then takes down only "
                    "its own device. See :ref:`isolation`."),
        "user_copy": ("``auto``, ``true`` or ``false``", "",
                      "Data path: ``auto`` uses USER_COPY when the kernel has it (6.5+), else buffer mode; "
                      "``true`` requires it; ``false`` forces buffer mode. See :ref:`buffer-modes`."),
        "options": ("a mapping", "the handler's ``options_schema``",
                    "The handler's own options, validated against its schema (see :ref:`builtin-handlers` "
                    "and :ref:`options-schema`)."),
    }


def _global_fields():
    """(dotted key, default) for every field of GlobalConfig, nested ones flattened."""
    from runner.config import GlobalConfig

    out = []
    for f in dataclasses.fields(GlobalConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            for sub in dataclasses.fields(default):
                out.append((f"{f.name}.{sub.name}", getattr(default, sub.name)))
        else:
            out.append((f.name, default))
    return out


def _device_fields():
    """(key, default, Opt or None) for every key the validator accepts in a device."""
    from runner.config import DeviceConfig, _Validator

    dc = {f.name: f for f in dataclasses.fields(DeviceConfig) if f.name != "line"}
    keys = list(_Validator.DEVICE_KEYS)
    if set(keys) != set(dc):
        raise ValueError(f"validator keys {sorted(set(keys) ^ set(dc))} do not match DeviceConfig fields")
    out = []
    for k in keys:
        f = dc[k]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out.append((k, default, _Validator.DEVICE_OPTS.get(k)))
    return out


def _check_described(what: str, keys: list[str], described: dict, location) -> None:
    missing = [k for k in keys if k not in described]
    extra = [k for k in described if k not in keys]
    if missing:
        log.warning("config schema drift: %s key(s) %s accepted by runner.config but not described in "
                    "docs/_ext/ublk_docs.py", what, ", ".join(missing), location=location)
    if extra:
        log.warning("config schema drift: %s key(s) %s described in docs/_ext/ublk_docs.py but no longer "
                    "accepted by runner.config", what, ", ".join(extra), location=location)


class ConfigSchema(_RstDirective):
    required_arguments = 1

    def lines(self):
        which = self.arguments[0]
        if which == "global":
            fields = _global_fields()
            desc = _global_descriptions()
            _check_described("runner:", [k for k, _ in fields], desc, self.get_location())
            rows = []
            for key, default in fields:
                typ, constraint, text = desc.get(key, ("?", "", "(undocumented)"))
                rows.append([f"``{key}``", typ, constraint, _fmt_default(default), text])
            return _list_table(["key", "type", "accepted", "default", "meaning"], rows, "18 12 18 14 38")
        if which == "device":
            fields = _device_fields()
            desc = _device_descriptions()
            _check_described("devices[]", [k for k, _, _ in fields], desc, self.get_location())
            rows = []
            for key, default, opt in fields:
                typ, constraint, text = desc.get(key, ("?", "", "(undocumented)"))
                if opt is not None:
                    typ = opt.expected()
                    generated = _opt_constraints(opt)
                    constraint = "; ".join(x for x in (generated, constraint) if x)
                if default is dataclasses.MISSING:
                    dflt = "required"
                elif key == "physical_block_size":
                    dflt = "= ``block_size``"
                elif key == "options":
                    dflt = "``{}``"
                else:
                    dflt = _fmt_default(default)
                rows.append([f"``{key}``", typ, constraint, dflt, text])
            return _list_table(["key", "type", "accepted", "default", "meaning"], rows, "16 12 20 12 40")
        raise ValueError(f"unknown schema {which!r} (expected global or device)")


# ---------------------------------------------------------------- built-in handlers

def _builtin_handlers():
    """Handler classes registered by the ublk-runner distribution itself."""
    from runner.plugins import RUNNER_DISTRIBUTION, Plugins, _norm

    # Plugins().load, not load_plugins(): UBLK_RUNNER_DISABLE_PLUGIN_AUTOLOAD
    # in the environment must not empty the reference.
    plugins = Plugins()
    plugins.load(autoload=True)
    ours = [e for e in plugins.errors if e.distribution and _norm(e.distribution) == RUNNER_DISTRIBUTION]
    if ours:
        raise RuntimeError("; ".join(str(e) for e in ours))
    out = []
    for name in plugins.registry.names():
        plugin, dist, _ = plugins.registry.owner(name)
        if dist and _norm(dist) == RUNNER_DISTRIBUTION:
            out.append((name, plugin, plugins.registry[name]))
    if not out:
        raise RuntimeError("no built-in handlers found: is ublk-runner installed (pip install -e .)?")
    return out


def options_table(schema) -> list[str]:
    from runner.handler import MISSING

    if not schema:
        return ["This handler takes no options.", ""]
    rows = []
    for key, opt in schema.items():
        if opt.required:
            dflt = "required"
        elif opt.default is MISSING:
            dflt = "``null``"
        else:
            dflt = _fmt_default(opt.default)
        rows.append([f"``{key}``", opt.expected(), _opt_constraints(opt), dflt, opt.help])
    return _list_table(["option", "type", "accepted", "default", "meaning"], rows, "14 14 20 14 38")


class BuiltinHandlers(_RstDirective):
    def lines(self):
        out = []
        for name, plugin, cls in _builtin_handlers():
            title = f"``{name}``"
            out += [title, "-" * len(title), ""]
            doc = inspect.getdoc(inspect.getmodule(cls)) or ""
            out += doc.splitlines() + [""]
            facts = [
                f"plugin (entry point) ``{plugin}``, module ``{cls.__module__}``",
                f"``thread_model``: ``{cls.thread_model}``",
                f"needs ``size:`` in the config: {'yes' if cls.size_required else 'no'}",
            ]
            out += [f"- {f}" for f in facts] + [""]
            out += options_table(cls.options_schema)
        return out


# ---------------------------------------------------------------- CLI

class CliHelp(_RstDirective):
    def lines(self):
        from runner.cli import build_parser

        saved = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "90"
        try:
            parser = build_parser()
            out = ["``ublk-runner``", "-" * 15, "", "::", ""]
            out += ["   " + line for line in parser.format_help().splitlines()] + [""]
            subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
            for name, sub in subs.choices.items():
                title = f"``ublk-runner {name}``"
                out += [f".. _cli-{name}:", "", title, "-" * len(title), "", "::", ""]
                out += ["   " + line for line in sub.format_help().splitlines()] + [""]
        finally:
            if saved is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = saved
        return out


# ---------------------------------------------------------------- kernel features

#: flag name -> (first kernel, in Debian 6.12.107, how ublk-runner uses it)
KERNEL_FEATURES = {
    "SUPPORT_ZERO_COPY": ("defined 6.0, works from 6.15", "masked off", "not used"),
    "URING_CMD_COMP_IN_TASK": ("6.0", "yes (forced on)", "implicit"),
    "NEED_GET_DATA": ("6.0", "yes", "library option ``need_get_data`` in buffer mode; the runner does not set it"),
    "USER_RECOVERY": ("6.1", "yes", "``recovery: auto|requeue`` (the default): a restarted runner or worker re-attaches, :ref:`recovery`"),
    "USER_RECOVERY_REISSUE": ("6.1", "yes", "``recovery: auto|reissue``: in-flight requests are issued again after recovery (handlers with ``idempotent_writes``)"),
    "UNPRIVILEGED_DEV": ("6.3", "yes", "not supported yet"),
    "CMD_IOCTL_ENCODE": ("6.4", "yes (forced on)", "**required**"),
    "USER_COPY": ("6.5 (with ``GET_FEATURES``)", "yes", "default data path (``user_copy: auto``); buffer mode without it"),
    "ZONED": ("6.6", "yes", "not used"),
    "USER_RECOVERY_FAIL_IO": ("6.13", "no", "not used"),
    "UPDATE_SIZE": ("6.16", "no", "not used (no online resize)"),
    "AUTO_BUF_REG": ("6.16", "no", "not used"),
    "QUIESCE": ("6.16", "no", "not used"),
    "PER_IO_DAEMON": ("6.16", "no", "not used (one thread per queue)"),
}


class KernelFeatures(_RstDirective):
    def lines(self):
        from runner.ublk import FEATURE_NAMES

        rows = []
        for bit, name in sorted(FEATURE_NAMES.items()):
            if name not in KERNEL_FEATURES:
                log.warning("kernel feature %s (runner.ublk.FEATURE_NAMES) has no row in docs/_ext/ublk_docs.py",
                            name, location=self.get_location())
                continue
            first, deb, use = KERNEL_FEATURES[name]
            rows.append([f"``{name}``", f"``{bit:#x}``", first, deb, use])
        for name in KERNEL_FEATURES:
            if name not in FEATURE_NAMES.values():
                log.warning("kernel feature %s is described in docs/_ext/ublk_docs.py but unknown to runner.ublk",
                            name, location=self.get_location())
        return _list_table(["flag", "bit", "first kernel", "Debian 6.12.107", "ublk-runner"], rows,
                           "24 10 18 16 32")


# ---------------------------------------------------------------- the benchmark plot

def _bench_plot_module(root: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ublk_bench_plot", os.path.join(root, "bench", "plot.py"))
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    return plot


def _bench_results(root: str) -> list[str]:
    import glob

    return sorted(glob.glob(os.path.join(root, "bench", "results", "*.json")))


def render_bench_plot(app):
    """docs/_generated/bench.svg from the committed bench/results/*.json, drawn by bench/plot.py
    at every build, so the figure and the tables (:class:`BenchResults`) cannot drift apart."""
    root = os.path.dirname(app.srcdir)
    _bench_plot_module(root).render(_bench_results(root), os.path.join(app.srcdir, "_generated", "bench.svg"))


class BenchResults(_RstDirective):
    """One table per committed bench result: IOPS, mean latency and the ratio to the run's
    reference, per workload."""

    def lines(self):
        root = os.path.dirname(self.env.srcdir)
        plot = _bench_plot_module(root)
        out = []
        for doc in plot.load(_bench_results(root)):
            self.env.note_dependency(doc["_path"])
            cells = {(t, wl): (ratio, iops) for t, wl, ratio, iops in plot.ratios(doc)}
            workloads = [wl for wl in plot.COLOURS if any(k[1] == wl for k in cells)]
            head = f"bench/{doc['bench']}.py: {doc.get('title', '')}, {doc.get('date', '')[:16].replace('T', ' ')} UTC"
            out += [f".. list-table:: {head}", "   :header-rows: 1", "",
                    "   * - target"] + [f"     - {wl} IOPS (ratio)" for wl in workloads]
            for target, row in doc["rows"].items():
                out.append(f"   * - {target}")
                for wl in workloads:
                    if (target, wl) in cells:
                        ratio, iops = cells[(target, wl)]
                        lat = row[wl].get("lat_us")
                        out.append(f"     - {iops:,.0f} (**{ratio:.2f}**)" + (f", {lat / 1000:.1f} ms" if lat else ""))
                    else:
                        out.append("     - --")
            out += ["", f"Reference: {doc['reference']}; guest kernel {doc.get('kernel', '?')}."
                    + (f" Skipped: {'; '.join(doc['skipped'])}." if doc.get("skipped") else ""), ""]
        return out


def setup(app):
    app.connect("builder-inited", render_bench_plot)
    app.add_directive("ublk-config-schema", ConfigSchema)
    app.add_directive("ublk-builtin-handlers", BuiltinHandlers)
    app.add_directive("ublk-cli", CliHelp)
    app.add_directive("ublk-kernel-features", KernelFeatures)
    app.add_directive("ublk-bench-results", BenchResults)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
