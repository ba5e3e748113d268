"""Runner configuration: YAML file -> validated dataclasses.

File layout (see ``conf/example.yaml``)::

    runner:                      # global section (optional; all keys optional)
      log_level: info            # debug | info | warning | error
      log_target: stderr         # stderr | journald | /absolute/path/to/file
      control_socket: /run/ublk-runner/control.sock
      state_dir: /run/ublk-runner
      metrics:
        prometheus_port: null    # 1..65535, or null = no exporter
        prometheus_addr: 127.0.0.1
      plugins:
        autoload: true           # load every installed ublk_runner entry point
        block: []                # plugin (entry-point) names never to load
    devices:                     # optional; an empty list is fine (the runner idles)
      - name: disk0              # required, unique, [A-Za-z0-9_.-]+, <= 64 chars
        handler: file            # required, a registered handler name
        size: 10G                # optional if the handler can tell (see parse_size)
        id: -1                   # fixed ublk device id 0..1048575; -1/absent = auto
        queues: 1                # 1..64
        depth: 128               # 1..4096
        block_size: 512          # logical: 512 | 1024 | 2048 | 4096
        physical_block_size: 512 # power of two >= block_size, <= 64K (default block_size)
        max_io_size: 1M          # multiple of 4K, 4K..32M
        read_only: false
        recovery: auto           # auto | none | requeue | reissue (auto: reissue if the
                                 #   handler declares idempotent writes, else requeue)
        recovery_grace: 30       # seconds a QUIESCED device waits for its backend on recovery
        request_timeout: 30      # seconds (> 0): a request's deadline, and control timeouts
        isolate: false           # serve this device from its own process
        user_copy: auto          # auto | true | false
        options: {}              # the handler's own options (its options_schema)

The global section is called ``runner:``. Rules: YAML ``null`` for an
optional key means "use the default". Keys are taken literally (``on:`` is
the key ``'on'``, not a boolean). Types are strict: YAML ``yes``/``on``/``true``
are booleans and are rejected where a number or a string is expected; a
number is not a string (quote it). Sizes: see :func:`runner.handler.parse_size`.

Every problem is reported as ``FILE:LINE: KEY.PATH: message`` and all of
them are collected into one :class:`~runner.errors.ConfigError`.

API: :func:`load_config` (file -> :class:`Config`), :func:`validate` (already
parsed data -> :class:`Config`), :func:`load_global` (only ``runner:``, for
choosing plugins before devices can be checked), :func:`device_digest` and
:func:`reload_plan` (SIGHUP: which devices to add, remove, restart, keep).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from typing import Any, Mapping

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import ConfigError
from .handler import (
    SIZE,
    DeviceSpec,
    Opt,
    OptionError,
    _describe,
    format_size,
    unknown_key_message,
    validate_options,
)

__all__ = [
    "Config",
    "DeviceConfig",
    "GlobalConfig",
    "MetricsConfig",
    "PluginsConfig",
    "ReloadPlan",
    "device_digest",
    "recovery_digest",
    "reload_plan",
    "load_config",
    "validate",
]

GLOBAL_SECTION = "runner"
DEFAULT_STATE_DIR = "/run/ublk-runner"
DEFAULT_CONTROL_SOCKET = "/run/ublk-runner/control.sock"
LOG_LEVELS = ("debug", "info", "warning", "error")
RECOVERY_MODES = ("auto", "none", "requeue", "reissue")
MAX_DEVICE_ID = (1 << 20) - 1  # UBLK_MINORS
DEVICE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


# --------------------------------------------------------------------------
# dataclasses


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    prometheus_port: int | None = None
    prometheus_addr: str = "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class PluginsConfig:
    autoload: bool = True
    block: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class GlobalConfig:
    log_level: str = "info"
    log_target: str = "stderr"
    control_socket: str = DEFAULT_CONTROL_SOCKET
    state_dir: str = DEFAULT_STATE_DIR
    metrics: MetricsConfig = MetricsConfig()
    plugins: PluginsConfig = PluginsConfig()


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """One device's effective configuration (defaults filled in).

    ``options`` holds the handler's validated options (every schema key,
    defaults filled in); without a registry it is the raw mapping.
    ``line`` is where the device starts in the file (not part of
    :func:`device_digest`).
    """

    name: str
    handler: str
    size: int | None = None
    id: int = -1
    queues: int = 1
    depth: int = 128
    block_size: int = 512
    physical_block_size: int = 512
    max_io_size: int = 1 << 20
    read_only: bool = False
    recovery: str = "auto"
    recovery_grace: float = 30.0
    request_timeout: float = 30.0
    isolate: bool = False
    user_copy: str | bool = "auto"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    line: int | None = dataclasses.field(default=None, compare=False)

    def spec(self) -> DeviceSpec:
        """The read-only view handed to ``Handler.open``."""
        return _spec(self)


def _spec(d: Any) -> DeviceSpec:
    return DeviceSpec(
        name=d.name,
        size=d.size,
        logical_block_size=d.block_size,
        physical_block_size=d.physical_block_size,
        read_only=d.read_only,
        queues=d.queues,
        depth=d.depth,
        max_io_size=d.max_io_size,
    )


@dataclasses.dataclass
class Config:
    global_: GlobalConfig = dataclasses.field(default_factory=GlobalConfig)
    devices: list[DeviceConfig] = dataclasses.field(default_factory=list)
    path: str | None = None

    def device(self, name: str) -> DeviceConfig | None:
        for d in self.devices:
            if d.name == name:
                return d
        return None


def device_digest(dev: DeviceConfig) -> str:
    """Stable SHA-256 (hex) of a device's effective configuration, for
    SIGHUP reloads: equal digests mean "leave the device alone". Covers
    every field including handler options and filled-in defaults, but not
    the device's position in the file."""
    d = dataclasses.asdict(dev)
    d.pop("line", None)
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


# Settings that only change how the runner treats a device, not what the device is; a device
# recovered after a restart may differ from its creator in these.
_RECOVERY_NEUTRAL = ("line", "request_timeout", "recovery_grace", "isolate")


def recovery_digest(dev: DeviceConfig) -> str:
    """Digest of what a QUIESCED device was made from (handler, options, layout): a restarted
    runner takes a device over only when its config entry still has the same one."""
    d = dataclasses.asdict(dev)
    for k in _RECOVERY_NEUTRAL:
        d.pop(k, None)
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ReloadPlan:
    """What a SIGHUP reload must do, by device name."""

    add: tuple[str, ...]  #: only in the new config: start
    remove: tuple[str, ...]  #: only in the old config: stop
    change: tuple[str, ...]  #: in both, digest differs: stop + start (or reconfigure)
    keep: tuple[str, ...]  #: in both, same digest: leave alone


def reload_plan(old: Config, new: Config) -> ReloadPlan:
    """Compare two configs device by device using :func:`device_digest`.
    Names keep the order of the new config (``remove``: of the old one)."""
    od = {d.name: device_digest(d) for d in old.devices}
    nd = {d.name: device_digest(d) for d in new.devices}
    return ReloadPlan(
        add=tuple(n for n in nd if n not in od),
        remove=tuple(n for n in od if n not in nd),
        change=tuple(n for n in nd if n in od and od[n] != nd[n]),
        keep=tuple(n for n in nd if n in od and od[n] == nd[n]),
    )


# --------------------------------------------------------------------------
# YAML with line numbers


class _Marks:
    """Line numbers (1-based) of values and keys, by path tuple."""

    def __init__(self) -> None:
        self.value: dict[tuple, int] = {}
        self.key: dict[tuple, int] = {}

    def line(self, path: tuple, key: bool = False) -> int | None:
        if key and path in self.key:
            return self.key[path]
        p = path
        while True:
            if p in self.value:
                return self.value[p]
            if p in self.key:
                return self.key[p]
            if not p:
                return None
            p = p[:-1]


_MERGE_TAG = "tag:yaml.org,2002:merge"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_OCTAL_RE = re.compile(r"^[-+]?0[0-9]+$")


class _Builder:
    def __init__(self, source: str):
        self.source = source
        self.marks = _Marks()
        self.errors: list[tuple[int, str]] = []
        self.ctor = yaml.constructor.SafeConstructor()

    def err(self, line: int, path: tuple, msg: str) -> None:
        label = _fmt_path(path)
        self.errors.append((line, f"{self.source}:{line}: {label + ': ' if label else ''}{msg}"))

    def build(self, node: Node, path: tuple) -> Any:
        line = node.start_mark.line + 1
        if isinstance(node, ScalarNode):
            self.marks.value[path] = line
            try:
                value = self.ctor.construct_object(node, deep=True)
            except yaml.YAMLError as e:
                self.err(line, path, f"invalid value: {getattr(e, 'problem', None) or e}")
                return _INVALID
            if node.style is None and node.tag in (_INT_TAG, _FLOAT_TAG):
                text = node.value.replace("_", "")
                if _OCTAL_RE.match(text) or ":" in text:
                    how = "an octal" if ":" not in text else "a base-60"
                    self.err(
                        line, path,
                        f"{node.value!r} is read by YAML as {how} number ({value}); "
                        f"write {value} if that is what you mean, or quote it if you meant text",
                    )
                    return _INVALID
            return value
        if isinstance(node, SequenceNode):
            self.marks.value[path] = line
            return [self.build(n, path + (i,)) for i, n in enumerate(node.value)]
        if isinstance(node, MappingNode):
            out: dict[str, Any] = {}
            own_lines: dict[str, int] = {}
            for knode, vnode in node.value:  # merges (<<) first, own keys override them
                if knode.tag != _MERGE_TAG:
                    continue
                srcs = vnode.value if isinstance(vnode, SequenceNode) else [vnode]
                for src in srcs:
                    if not isinstance(src, MappingNode):
                        self.err(src.start_mark.line + 1, path, "'<<' must merge a mapping or a list of mappings")
                        continue
                    for k, v in self.build(src, path).items():
                        out.setdefault(k, v)
            for knode, vnode in node.value:
                if knode.tag == _MERGE_TAG:
                    continue
                kline = knode.start_mark.line + 1
                if not isinstance(knode, ScalarNode):
                    self.err(kline, path, "mapping keys must be plain strings")
                    continue
                key = knode.value  # literally: 'on:' is the key 'on', '1:' is '1'
                if key in own_lines:
                    self.err(kline, path + (key,), f"duplicate key (first given at line {own_lines[key]})")
                    continue
                own_lines[key] = kline
                self.marks.key[path + (key,)] = kline
                out[key] = self.build(vnode, path + (key,))
            self.marks.value[path] = line
            return out
        self.err(line, path, f"unsupported YAML node {type(node).__name__}")  # pragma: no cover
        return _INVALID


class _Invalid:
    def __repr__(self) -> str:  # pragma: no cover
        return "<invalid>"


_INVALID: Any = _Invalid()


def _has_invalid(v: Any) -> bool:
    if v is _INVALID:
        return True
    if isinstance(v, dict):
        return any(_has_invalid(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_has_invalid(x) for x in v)
    return False


def _fmt_path(path: tuple) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out


def _yaml_error(source: str, e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    cm = getattr(e, "context_mark", None)
    text = "invalid YAML"
    if mark is not None:
        text += f" at column {mark.column + 1}"
    text += f": {problem}"
    if "\\t" in problem or "\t" in problem:
        text += " (YAML does not allow tabs for indentation; use spaces)"
    if context:
        where = f" that starts at line {cm.line + 1}" if cm is not None and mark is not None and cm.line != mark.line else ""
        text += f" ({context}{where})"
    if mark is None:
        return f"{source}: {text}"
    return f"{source}:{mark.line + 1}: {text}"


def parse_yaml(text: str, source: str) -> tuple[Any, _Marks, list[tuple[int, str]]]:
    """Parse one YAML document into plain Python values, a line map, and
    value-level problems ``(line, message)`` (duplicate keys, ambiguous
    numbers; the offending values are left out). Raises
    :class:`ConfigError` for syntax errors."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError([_yaml_error(source, e)]) from None
    b = _Builder(source)
    if node is None:
        return None, b.marks, []
    data = b.build(node, ())
    return data, b.marks, b.errors


# --------------------------------------------------------------------------
# validation


class _Validator:
    def __init__(self, source: str, marks: _Marks | None, registry: Any):
        self.source = source
        self.marks = marks or _Marks()
        self.registry = registry
        self.errors: list[tuple[int, int, str]] = []

    def err(self, path: tuple, msg: str, key: bool = False) -> None:
        line = self.marks.line(path, key=key)
        loc = f"{self.source}:{line}" if line else self.source
        label = _fmt_path(path)
        self.errors.append((line or 0, len(self.errors), f"{loc}: {label + ': ' if label else ''}{msg}"))

    def mapping(self, value: Any, path: tuple, what: str) -> dict | None:
        if value is None:
            return {}
        if value is _INVALID:
            return None
        if isinstance(value, dict):
            return value
        self.err(path, f"expected a mapping ({what}), got {_describe(value)}")
        return None

    def unknown_keys(self, d: dict, path: tuple, known: Any, hints: Mapping[str, str] | None = None) -> None:
        for k in d:
            if k not in known:
                if hints and k in hints:
                    self.err(path + (k,), f"unknown key; did you mean {hints[k]!r}?", key=True)
                else:
                    self.err(path + (k,), unknown_key_message(k, known), key=True)

    def field(self, d: dict, path: tuple, key: str, opt: Opt, default: Any = None) -> Any:
        """Convert ``d[key]`` with ``opt``; absent or null -> ``default``;
        on error record it and return ``_INVALID``."""
        v = d.get(key)
        if v is None:
            return default
        if _has_invalid(v):
            return _INVALID
        try:
            return opt.convert(v)
        except OptionError as e:
            self.err(path + (key,) + e.path, e.message)
            return _INVALID

    # -- global section ----------------------------------------------------

    def global_section(self, raw: Any) -> GlobalConfig:
        path = (GLOBAL_SECTION,)
        g = self.mapping(raw, path, "the runner's global settings")
        if g is None:
            return GlobalConfig()
        known = ("log_level", "log_target", "control_socket", "state_dir", "metrics", "plugins")
        self.unknown_keys(g, path, known)
        out: dict[str, Any] = {}
        lvl = self.field(g, path, "log_level", Opt(str), "info")
        if lvl is not _INVALID:
            if lvl.lower() not in LOG_LEVELS:
                self.err(path + ("log_level",), f"{lvl!r} is not a log level (expected one of: {', '.join(LOG_LEVELS)})")
            else:
                out["log_level"] = lvl.lower()
        tgt = self.field(g, path, "log_target", Opt(str), "stderr")
        if tgt is not _INVALID:
            if tgt in ("stderr", "journald") or os.path.isabs(tgt):
                out["log_target"] = tgt
            else:
                self.err(path + ("log_target",), f"{tgt!r} is not a log target (expected 'stderr', 'journald' or an absolute file path)")
        for key, dflt in (("control_socket", DEFAULT_CONTROL_SOCKET), ("state_dir", DEFAULT_STATE_DIR)):
            v = self.field(g, path, key, Opt(str), dflt)
            if v is not _INVALID:
                if os.path.isabs(v):
                    out[key] = v
                else:
                    self.err(path + (key,), f"{v!r} is not an absolute path (expected e.g. {dflt})")
        mpath = path + ("metrics",)
        m = self.mapping(g.get("metrics"), mpath, "metrics settings")
        if m is not None:
            self.unknown_keys(m, mpath, ("prometheus_port", "prometheus_addr"))
            port = self.field(m, mpath, "prometheus_port", Opt(int, min=1, max=65535), None)
            addr = self.field(m, mpath, "prometheus_addr", Opt(str), "127.0.0.1")
            if addr == "":
                self.err(mpath + ("prometheus_addr",), "empty address (expected an IP address or host name, e.g. 127.0.0.1)")
            if _INVALID not in (port, addr) and addr:
                out["metrics"] = MetricsConfig(prometheus_port=port, prometheus_addr=addr)
        ppath = path + ("plugins",)
        p = self.mapping(g.get("plugins"), ppath, "plugin settings")
        if p is not None:
            self.unknown_keys(p, ppath, ("autoload", "block"))
            autoload = self.field(p, ppath, "autoload", Opt(bool), True)
            block = self.field(p, ppath, "block", Opt(list[str]), [])
            if _INVALID not in (autoload, block):
                out["plugins"] = PluginsConfig(autoload=autoload, block=tuple(block))
        return GlobalConfig(**out)

    # -- devices -----------------------------------------------------------

    DEVICE_KEYS = (
        "name", "handler", "size", "id", "queues", "depth", "block_size", "physical_block_size",
        "max_io_size", "read_only", "recovery", "recovery_grace", "request_timeout", "isolate", "user_copy",
        "options",
    )  # fmt: skip
    DEVICE_OPTS = {
        "size": Opt(SIZE),
        "id": Opt(int, min=-1, max=MAX_DEVICE_ID),
        "queues": Opt(int, min=1, max=64),
        "depth": Opt(int, min=1, max=4096),
        "block_size": Opt(SIZE, choices=[512, 1024, 2048, 4096]),
        "physical_block_size": Opt(SIZE, min=512, max=65536),
        "max_io_size": Opt(SIZE, min=4096, max=32 << 20),
        "read_only": Opt(bool),
        "recovery": Opt(str, choices=RECOVERY_MODES),
        "recovery_grace": Opt(float, min=0),
        "request_timeout": Opt(float),
        "isolate": Opt(bool),
    }

    def device(self, raw: Any, i: int) -> DeviceConfig | None:
        path = ("devices", i)
        d = self.mapping(raw, path, "a device: name, handler, size, options, ...")
        if d is None:
            return None
        self.unknown_keys(d, path, self.DEVICE_KEYS)
        ok = True
        defaults = {f.name: f.default for f in dataclasses.fields(DeviceConfig) if f.default is not dataclasses.MISSING}
        v: dict[str, Any] = {}

        # name / handler
        name = self.field(d, path, "name", Opt(str))
        if name is None and "name" in d:
            self.err(path + ("name",), "no value (expected a unique device name, e.g. disk0)")
            ok = False
        elif name is None:
            self.err(path, "missing required key 'name' (a unique device name, e.g. disk0)")
            ok = False
        elif name is not _INVALID:
            if not DEVICE_NAME_RE.match(name) or name in (".", ".."):
                self.err(path + ("name",), f"{name!r} is not a valid device name (expected 1-64 characters from A-Z a-z 0-9 _ . -, not '.' or '..')")
                ok = False
        else:
            ok = False
        v["name"] = name

        hname = self.field(d, path, "handler", Opt(str))
        hcls = None
        if hname is None and "handler" in d:
            self.err(
                path + ("handler",),
                "no value (YAML reads null, ~ and an empty value as nothing; "
                "for the null handler write handler: \"null\")" + self._known_handlers(),
            )
            ok = False
        elif hname is None:
            self.err(path, "missing required key 'handler'" + self._known_handlers())
            ok = False
        elif hname is _INVALID:
            ok = False
        elif self.registry is not None:
            hcls = self.registry.get(hname)
            if hcls is None:
                known = list(self.registry.names())
                msg = f"unknown handler {hname!r}{self._known_handlers()}"
                close = difflib.get_close_matches(hname, known, n=1)
                if close:
                    msg += f"; did you mean {close[0]!r}?"
                self.err(path + ("handler",), msg)
                ok = False
        v["handler"] = hname

        for key, opt in self.DEVICE_OPTS.items():
            dflt = None if key == "physical_block_size" else defaults.get(key)  # None: = block_size
            val = self.field(d, path, key, opt, dflt)
            if val is _INVALID:
                ok = False
            v[key] = val

        # user_copy: auto | true | false
        uc = d.get("user_copy")
        if uc is None:
            v["user_copy"] = "auto"
        elif isinstance(uc, bool) or uc == "auto":
            v["user_copy"] = uc
        elif uc is not _INVALID:
            self.err(path + ("user_copy",), f"expected auto, true or false, got {_describe(uc)}")
            ok = False

        # cross-field checks
        rt = v["request_timeout"]
        if rt is not _INVALID and not rt > 0:
            self.err(path + ("request_timeout",), f"{rt!r} is not a timeout (expected a number of seconds > 0)")
            ok = False
        lbs = v["block_size"]
        pbs = v["physical_block_size"]
        if pbs is None:
            pbs = v["physical_block_size"] = lbs
        elif pbs is not _INVALID:
            if pbs & (pbs - 1):
                self.err(path + ("physical_block_size",), f"{format_size(pbs)} is not a power of two (expected e.g. 4096)")
                ok = False
            elif lbs is not _INVALID and pbs < lbs:
                self.err(path + ("physical_block_size",), f"{pbs} is smaller than block_size {lbs} (expected physical_block_size >= block_size)")
                ok = False
        size = v["size"]
        if size is not None and size is not _INVALID:
            if size == 0:
                self.err(path + ("size",), "0 is not a usable size (expected a positive size, e.g. 512M, or omit it to let the handler decide)")
                ok = False
            elif lbs is not _INVALID and size % lbs:
                self.err(path + ("size",), f"{_size_text(size)} is not a multiple of block_size {lbs}")
                ok = False
        mio = v["max_io_size"]
        if mio is not _INVALID and mio % 4096:
            self.err(path + ("max_io_size",), f"{format_size(mio)} is not a multiple of 4K")
            ok = False

        if hcls is not None and hcls.size_required and size is None:
            self.err(path, f"missing required key 'size' (handler {hname!r} cannot tell the device size by itself; e.g. size: 1G)")
            ok = False

        # handler options
        raw_opts = d.get("options")
        opts_path = path + ("options",)
        if _has_invalid(raw_opts):
            ok = False
        elif hcls is not None:
            opts, errs = validate_options(hcls.options_schema, raw_opts, hname)
            for sub, msg in errs:
                self.err(opts_path + sub, msg)
            if errs:
                ok = False
            if ok:
                try:
                    hcls.check_config(opts, _spec(_NS(v)))
                except ValueError as e:
                    self.err(opts_path, str(e))
                    ok = False
                except Exception as e:  # a handler bug must not crash config loading
                    self.err(opts_path, f"handler {hname!r} check_config() failed: {type(e).__name__}: {e}")
                    ok = False
            v["options"] = opts
        else:
            m = self.mapping(raw_opts, opts_path, "the handler's options")
            if m is None:
                ok = False
            v["options"] = dict(m or {})
        if not ok:
            return None
        return DeviceConfig(**v, line=self.marks.line(path))

    def _known_handlers(self) -> str:
        if self.registry is None:
            return ""
        names = list(self.registry.names())
        return f" (known handlers: {', '.join(names)})" if names else " (no handlers are registered; is a plugin missing?)"

    # -- whole file --------------------------------------------------------

    def config(self, data: Any) -> Config:
        if data is None:
            data = {}
        if data is _INVALID:
            raise self.error()
        if not isinstance(data, dict):
            self.err((), f"the top level must be a mapping with '{GLOBAL_SECTION}:' and 'devices:', got {_describe(data)}")
            raise self.error()
        self.unknown_keys(data, (), (GLOBAL_SECTION, "devices"), hints={"global": GLOBAL_SECTION, "device": "devices"})
        g = self.global_section(data.get(GLOBAL_SECTION))
        raw_devs = data.get("devices")
        devices: list[DeviceConfig] = []
        if raw_devs is None or raw_devs is _INVALID:
            raw_devs = []
        if not isinstance(raw_devs, (list, tuple)):
            self.err(("devices",), f"expected a list of devices (each item starting with '- name: ...'), got {_describe(raw_devs)}")
            raw_devs = []
        names: dict[str, int] = {}
        ids: dict[int, int] = {}
        for i, raw in enumerate(raw_devs):
            # duplicates are checked on the raw values so they are found
            # even when the device has other errors
            if isinstance(raw, dict):
                n = raw.get("name")
                if isinstance(n, str):
                    if n in names:
                        self.err(("devices", i, "name"), f"duplicate device name {n!r} (also used by devices[{names[n]}])")
                    else:
                        names[n] = i
                fid = raw.get("id")
                if type(fid) is int and fid >= 0:
                    if fid in ids:
                        self.err(("devices", i, "id"), f"duplicate device id {fid} (also used by devices[{ids[fid]}]; use -1 or omit it for automatic ids)")
                    else:
                        ids[fid] = i
            dev = self.device(raw, i)
            if dev is not None:
                devices.append(dev)
        if self.errors:
            raise self.error()
        return Config(global_=g, devices=devices, path=self.source)

    def error(self) -> ConfigError:
        return ConfigError([m for _, _, m in sorted(self.errors)])


def _size_text(n: int) -> str:
    f = format_size(n)
    return f if f == str(n) else f"{f} ({n} bytes)"


class _NS:
    def __init__(self, d: dict):
        self.__dict__.update(d)


def validate(config_dict: Any, source: str = "<config>", registry: Any = None, *, marks: _Marks | None = None) -> Config:
    """Validate an already-parsed configuration (plain dicts/lists, as from
    ``yaml.safe_load`` or built in code) and return a :class:`Config`.

    ``source`` names the origin in messages. ``registry`` (a
    :class:`runner.plugins.HandlerRegistry`, or anything with ``get(name)``
    and ``names()``) is needed to check handler names and options; with
    ``None`` they are not checked and ``options`` stay as given. ``marks``
    (internal) carries line numbers when called from :func:`load_config`.
    Raises :class:`ConfigError` listing every problem found.
    """
    return _Validator(str(source), marks, registry).config(config_dict)


def load_global(path: str | os.PathLike) -> GlobalConfig:
    """Read a config file and validate only its ``runner:`` section.

    For start-up: the ``plugins:`` settings decide which plugins to load, and
    the devices can only be validated once the plugins have registered
    their handlers. So: ``g = load_global(p)``; ``plugins =
    load_plugins(g.plugins.autoload, g.plugins.block, cli_extra)``;
    ``cfg = load_config(p, plugins.registry)``. Raises
    :class:`ConfigError` for syntax errors and problems in ``runner:``.
    """
    source, text = _read(path)
    data, marks, problems = parse_yaml(text, source)
    v = _Validator(source, marks, None)
    v.errors.extend((line, -1, msg) for line, msg in problems if msg.startswith(f"{source}:{line}: {GLOBAL_SECTION}"))
    g = v.global_section(data.get(GLOBAL_SECTION) if isinstance(data, dict) else None)
    if v.errors:
        raise v.error()
    return g


def _read(path: str | os.PathLike) -> tuple[str, str]:
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError([f"{source}: cannot read the config file: {e.strerror or e}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError([f"{source}:{line}: the file is not valid UTF-8"]) from None
    return source, text


def load_config(path: str | os.PathLike, registry: Any = None) -> Config:
    """Read, parse and validate a YAML config file. Raises
    :class:`ConfigError` (with file and line in each message)."""
    source, text = _read(path)
    data, marks, problems = parse_yaml(text, source)
    v = _Validator(source, marks, registry)
    v.errors.extend((line, -1, msg) for line, msg in problems)
    return v.config(data)
