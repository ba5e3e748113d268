"""The handler contract: how a storage backend plugs into ublk-runner.

A *handler* is a class, registered under a short name by a plugin (see
:mod:`runner.hookspecs`). For each device that names it, the runner

1. validates the device's ``options:`` mapping against the class's
   :attr:`Handler.options_schema` (config load time, before anything opens),
2. calls :meth:`Handler.check_config` for cross-option checks (also at load
   time),
3. calls :meth:`Handler.open` with the validated options and a read-only
   :class:`DeviceSpec`, getting back a handler *instance*,
4. reads the instance's geometry (``size``, ``logical_block_size``,
   ``physical_block_size``) and capabilities (``can_write``, ``can_flush``,
   ``can_fua``, ``can_discard``, ``can_write_zeroes``) once, to set up the
   kernel device (see :func:`check_instance`),
5. calls the IO methods (:meth:`~Handler.read`, :meth:`~Handler.write`,
   :meth:`~Handler.flush`, :meth:`~Handler.discard`,
   :meth:`~Handler.write_zeroes`, or :meth:`~Handler.handle_batch`) from the
   device's queue threads,
6. calls :meth:`Handler.close` once when the device stops.

IO methods are plain methods, never pluggy hooks: a hook call costs ~1 µs,
a bound-method call ~25 ns.

Errors: any exception raised by an IO method (or by the awaitable it
returns) fails that one request. An :class:`OSError` carrying an errno
completes the request with that errno; anything else completes it with EIO
(see :func:`errno_of`). The device keeps running.

This module also defines the declarative option schema (:class:`Opt`) and
the size syntax (:func:`parse_size`) shared with :mod:`runner.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno as _errno
import re
import typing
from typing import Any, Awaitable, ClassVar, Iterable, Mapping, Sequence

__all__ = [
    "API_VERSION",
    "DeviceSpec",
    "Handler",
    "HandlerContractError",
    "Opt",
    "OptionError",
    "SIZE",
    "Size",
    "check_handler_class",
    "check_instance",
    "errno_of",
    "format_size",
    "parse_size",
    "validate_options",
]

#: The handler API this runner implements. A handler declares the version it
#: was written against; the major must match and its minor must not exceed
#: ours (a handler written for 1.3 may rely on things 1.0 lacks).
API_VERSION: tuple[int, int] = (1, 0)

THREAD_MODELS = ("serialize", "parallel")
NATIVE_TARGETS = ("null", "file")
HANDLER_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
OPTION_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


# --------------------------------------------------------------------------
# sizes

_SIZE_RE = re.compile(r"^\s*(?P<num>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[A-Za-z]*)\s*$")
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}

SIZE_EXPECTED = "expected a number with an optional K/M/G/T suffix, e.g. 512M"


def parse_size(value: Any) -> int:
    """Parse a size in bytes.

    Accepted: a non-negative integer (``4096``), or a string holding an
    integer with an optional binary suffix: ``K``/``M``/``G``/``T``/``P``
    (case-insensitive) or ``KiB``/``MiB``/``GiB``/``TiB``/``PiB``, meaning
    powers of 1024; ``B`` alone means bytes. ``512M`` = 536870912.

    Rejected, on purpose: fractions (``1.5G`` -- write ``1536M``), decimal
    SI units (``KB``/``MB``/``GB``: ambiguous between 1000 and 1024),
    negatives and booleans. Raises :class:`ValueError` whose message says
    what was expected.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{_describe(value)} is not a size ({SIZE_EXPECTED})")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is not a size (must not be negative)")
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a size ({SIZE_EXPECTED})")
    num, unit = m.group("num"), m.group("unit")
    u = unit.lower()
    if u in ("b",):
        u = ""
    elif len(u) == 3 and u.endswith("ib") and u[0] in "kmgtp":
        u = u[0]
    elif len(u) == 2 and u.endswith("b") and u[0] in "kmgtp":
        raise ValueError(
            f"{value!r} is not a size ({unit!r} is ambiguous; write "
            f"{num}{unit[0].upper()} or {num}{unit[0].upper()}iB for powers of 1024)"
        )
    if u not in _UNITS:
        raise ValueError(f"{value!r} is not a size ({SIZE_EXPECTED})")
    if "." in num:
        raise ValueError(
            f"{value!r} is not a size (fractions are not accepted; use a smaller "
            f"unit, e.g. 1536M instead of 1.5G)"
        )
    return int(num) * (1024 ** _UNITS[u])


def format_size(n: int) -> str:
    """Render a byte count with the largest exact binary suffix (``512M``)."""
    for suffix, shift in (("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


# --------------------------------------------------------------------------
# option schema


class Size(int):
    """Marker type for :class:`Opt`: a byte count written with
    :func:`parse_size` syntax (``512M``, ``4096``, ``1GiB``). Validated values
    are plain :class:`int`."""


SIZE = Size

_SCALAR_TYPES: dict[Any, str] = {
    str: "a string",
    int: "an integer",
    bool: "a boolean",
    float: "a number",
    Size: "a size",
}
_TYPE_BY_NAME = {"str": str, "int": int, "bool": bool, "float": float, "size": Size}


class _Missing:
    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return "MISSING"


MISSING: Any = _Missing()


class OptionError(ValueError):
    """A value does not fit an :class:`Opt`. ``path`` locates it below the
    option itself (a list index), for error messages."""

    def __init__(self, message: str, path: tuple = ()):
        super().__init__(message)
        self.message = message
        self.path = path


class SchemaError(TypeError):
    """An :class:`Opt` or an ``options_schema`` is malformed (a bug in the
    handler, reported at registration time)."""


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    if isinstance(v, int):
        return f"integer {v}"
    if isinstance(v, float):
        return f"number {v!r}"
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


def _bool_hint(v: Any, text: bool = False) -> str:
    if isinstance(v, bool):
        q = "; quote it if you meant text" if text else ""
        return f" (YAML reads yes/no/on/off/true/false as booleans{q})"
    if text and isinstance(v, (int, float)):
        return " (quote it to make it a string)"
    return ""


class Opt:
    """One handler option, declared in ``options_schema``::

        options_schema = {
            "path": Opt(str, required=True, help="backing file"),
            "direct": Opt(bool, default=False, help="use O_DIRECT"),
            "latency_us": Opt(int, default=0, min=0),
            "cache": Opt(SIZE, default="64M"),
            "mode": Opt(str, choices=["rw", "ro"], default="rw"),
            "servers": Opt(list[str], default=[]),
        }

    ``type`` is one of ``str``, ``int``, ``bool``, ``float``, :data:`SIZE`
    (also spelled ``"str"``, ``"int"``, ``"bool"``, ``"float"``,
    ``"size"``), or ``list[T]`` of one of those. Conversion is strict: a
    boolean is never an integer, a number is never a string; ``float``
    accepts integers; ``SIZE`` accepts integers and size strings.
    ``min``/``max`` bound numbers and sizes (for lists: each item);
    ``choices`` restricts values (each item). An option that is neither
    required nor has a default validates to ``None`` when absent. A default
    goes through the same conversion, so ``default="64M"`` yields an int.
    """

    __slots__ = ("type", "item_type", "required", "default", "min", "max", "choices", "help")

    def __init__(
        self,
        type: Any,
        *,
        required: bool = False,
        default: Any = MISSING,
        min: float | None = None,
        max: float | None = None,
        choices: Sequence[Any] | None = None,
        help: str = "",
    ):
        self.item_type = None
        if isinstance(type, str):
            if type not in _TYPE_BY_NAME:
                raise SchemaError(f"unknown option type {type!r} (expected one of {sorted(_TYPE_BY_NAME)})")
            type = _TYPE_BY_NAME[type]
        if typing.get_origin(type) is list:
            args = typing.get_args(type)
            item = args[0] if args else None
            if isinstance(item, str):
                item = _TYPE_BY_NAME.get(item)
            if item not in _SCALAR_TYPES:
                raise SchemaError(f"list item type must be one of str/int/bool/float/SIZE, not {item!r}")
            self.item_type = item
            type = list
        elif type not in _SCALAR_TYPES:
            raise SchemaError(f"option type must be str/int/bool/float/SIZE or list[...], not {type!r}")
        self.type = type
        base = self.item_type or type
        if (min is not None or max is not None) and base not in (int, float, Size):
            raise SchemaError("min/max only apply to int, float and SIZE options")
        self.min, self.max = min, max
        self.choices = list(choices) if choices is not None else None
        if self.choices is not None:
            for c in self.choices:
                try:
                    self._convert_scalar(base, c)
                except OptionError as e:
                    raise SchemaError(f"choice {c!r}: {e.message}") from None
            if base is Size:
                self.choices = [parse_size(c) for c in self.choices]
        self.required = bool(required)
        self.help = help
        if required and default is not MISSING:
            raise SchemaError("an option cannot be both required and have a default")
        if default is not MISSING and default is not None:
            try:
                default = self.convert(default)
            except OptionError as e:
                raise SchemaError(f"default {default!r}: {e.message}") from None
        self.default = default

    # -- conversion --------------------------------------------------------

    def expected(self) -> str:
        """Human description of what this option accepts."""
        if self.type is list:
            return f"a list of {_SCALAR_TYPES[self.item_type].split(' ', 1)[1]}s"
        return _SCALAR_TYPES[self.type]

    @staticmethod
    def _convert_scalar(t: Any, v: Any) -> Any:
        if t is bool:
            if isinstance(v, bool):
                return v
            raise OptionError(f"expected a boolean (true/false), got {_describe(v)}")
        if t is int:
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            raise OptionError(f"expected an integer, got {_describe(v)}{_bool_hint(v)}")
        if t is float:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
            raise OptionError(f"expected a number, got {_describe(v)}{_bool_hint(v)}")
        if t is str:
            if isinstance(v, str):
                return v
            raise OptionError(f"expected a string, got {_describe(v)}{_bool_hint(v, text=True)}")
        if t is Size:
            try:
                return parse_size(v)
            except ValueError as e:
                raise OptionError(str(e)) from None
        raise SchemaError(f"bad type {t!r}")  # pragma: no cover

    def _check_item(self, t: Any, v: Any) -> Any:
        v = self._convert_scalar(t, v)
        fmt = format_size if t is Size else repr
        lo, hi = self.min, self.max
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            if lo is not None and hi is not None:
                raise OptionError(f"{fmt(v)} is out of range (expected {fmt(lo)}..{fmt(hi)})")
            if lo is not None:
                raise OptionError(f"{fmt(v)} is too small (expected at least {fmt(lo)})")
            raise OptionError(f"{fmt(v)} is too large (expected at most {fmt(hi)})")
        if self.choices is not None and v not in self.choices:
            raise OptionError(f"{fmt(v)} is not one of {', '.join(fmt(c) for c in self.choices)}")
        return v

    def convert(self, value: Any) -> Any:
        """Validate and convert one value; raises :class:`OptionError`."""
        if self.type is list:
            if not isinstance(value, (list, tuple)):
                raise OptionError(f"expected {self.expected()}, got {_describe(value)}")
            out = []
            for i, item in enumerate(value):
                try:
                    out.append(self._check_item(self.item_type, item))
                except OptionError as e:
                    raise OptionError(e.message, (i,) + e.path) from None
            return out
        return self._check_item(self.type, value)

    def default_value(self) -> Any:
        d = self.default
        if d is MISSING:
            return None
        return list(d) if isinstance(d, list) else d

    def __repr__(self) -> str:
        t = f"list[{self.item_type.__name__}]" if self.type is list else self.type.__name__
        parts = [t]
        if self.required:
            parts.append("required=True")
        if self.default is not MISSING:
            parts.append(f"default={self.default!r}")
        return f"Opt({', '.join(parts)})"


def check_schema(schema: Any) -> list[str]:
    """Problems with an ``options_schema`` (empty list = well-formed)."""
    if not isinstance(schema, Mapping):
        return [f"options_schema must be a dict of name -> Opt, not {type(schema).__name__}"]
    problems = []
    for key, opt in schema.items():
        if not isinstance(key, str) or not OPTION_NAME_RE.match(key):
            problems.append(f"options_schema key {key!r} is not a valid option name")
        if not isinstance(opt, Opt):
            problems.append(f"options_schema[{key!r}] must be an Opt(...), not {type(opt).__name__}")
    return problems


def unknown_key_message(key: Any, known: Iterable[str], what: str = "key") -> str:
    """``unknown KEY; did you mean 'x'?`` or ``unknown KEY (expected one of ...)``."""
    known = sorted(known)
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    if close:
        return f"unknown {what}; did you mean {close[0]!r}?"
    if not known:
        return f"unknown {what} (none are accepted here)"
    return f"unknown {what} (expected one of: {', '.join(known)})"


def validate_options(
    schema: Mapping[str, Opt], raw: Any, handler: str = ""
) -> tuple[dict[str, Any], list[tuple[tuple, str]]]:
    """Validate ``raw`` (a device's ``options:`` mapping, or None) against
    ``schema``. A ``None`` value counts as absent (YAML ``null`` = default).

    Returns ``(options, errors)``: ``options`` is a plain dict holding every
    schema key (defaults filled in, absent optional keys as ``None``);
    ``errors`` is a list of ``(path, message)`` where ``path`` is a tuple of
    keys/indexes below the options mapping (``()`` = the mapping itself).
    """
    errors: list[tuple[tuple, str]] = []
    out: dict[str, Any] = {}
    who = f" for handler {handler!r}" if handler else ""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        return out, [((), f"expected a mapping of handler options, got {_describe(raw)}")]
    raw = {k: v for k, v in raw.items() if v is not None}  # null = "use the default"
    for key, value in raw.items():
        if key not in schema:
            errors.append(((key,), unknown_key_message(key, schema, f"option{who}")))
            continue
        try:
            out[key] = schema[key].convert(value)
        except OptionError as e:
            errors.append(((key,) + e.path, e.message))
    for key, opt in schema.items():
        if key in raw:
            continue
        if opt.required:
            h = f" ({opt.help})" if opt.help else ""
            errors.append(((), f"missing required option {key!r}{who}{h}"))
        else:
            out[key] = opt.default_value()
    return out, errors


# --------------------------------------------------------------------------
# the device as the handler sees it


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """What the configuration says about a device, as passed to
    :meth:`Handler.open`. Read-only.

    ``size`` is ``None`` when the config leaves it to the handler (e.g. the
    size of a backing file); block sizes are bytes.

    ``recovering`` is True when the runner opens the handler to take over a
    device that already served data before the runner died (user
    recovery). The backend must then be the one that served it: never
    create, format or truncate it; raise if it is gone, and the runner
    retries until ``recovery_grace`` runs out.
    """

    name: str
    size: int | None = None
    logical_block_size: int = 512
    physical_block_size: int = 512
    read_only: bool = False
    queues: int = 1
    depth: int = 128
    max_io_size: int = 1 << 20
    recovering: bool = False


# --------------------------------------------------------------------------
# the handler base class


class _Capability:
    """Default for ``can_*``: True when the subclass overrides ``method``.

    A non-data descriptor, so subclasses may override it with a class
    attribute, a property, or an instance attribute set in ``__init__``.
    """

    def __init__(self, method: str):
        self.method = method

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> bool:
        if objtype is None:
            objtype = type(obj)
        return getattr(objtype, self.method, None) is not getattr(Handler, self.method)


class Handler:
    """Base class for handlers. Subclass it, set :attr:`name`, implement
    :meth:`read` (and whatever else the backend supports), register the
    class from a plugin's ``ublk_runner_register_handlers`` hook.

    Threads: :meth:`open`, :meth:`check_config` and :meth:`close` run on the
    runner's control thread and may block (open files, connect to servers).
    IO methods run on the device's queue threads (one per queue); see
    :attr:`thread_model`. Blocking in an IO method stalls that queue only.

    Async: an IO method may return an awaitable instead of finishing in
    place; the queue thread's event loop awaits it and completes the request
    then, so one queue can have many requests in flight. An exception raised
    by the awaitable fails the request like a raised one.
    """

    #: Registry name, referenced by ``handler:`` in the config. Lower-case
    #: letters, digits, ``-`` and ``_``; starts with a letter; <= 64 chars.
    name: ClassVar[str] = ""

    #: Handler API version the class was written against (major, minor).
    API_VERSION: ClassVar[tuple[int, int]] = API_VERSION

    #: ``{option name: Opt(...)}`` for the device's ``options:`` mapping.
    options_schema: ClassVar[Mapping[str, Opt]] = {}

    #: ``'serialize'`` (default): the runner never calls this instance's IO
    #: methods from two threads at once (multi-queue devices take a
    #: per-device lock), so the handler needs no locking.
    #: ``'parallel'``: each queue thread calls IO methods concurrently; the
    #: handler must be thread-safe.
    thread_model: ClassVar[str] = "serialize"

    #: ``True`` if the device cannot work without a ``size:`` in the config
    #: (e.g. ``null``); checked at config load time.
    size_required: ClassVar[bool] = False

    #: ``True`` if a write may safely be executed twice, as long as no later
    #: write to the same range was acknowledged in between (true of almost
    #: every block backend: it stores data at an offset). Then a device with
    #: ``recovery: auto`` is created with USER_RECOVERY_REISSUE, and requests
    #: in flight when the runner died are given again to the new process
    #: instead of failing with EIO. Leave it ``False`` for backends where a
    #: repeated write has a side effect (an append-only log, a counter).
    idempotent_writes: ClassVar[bool] = False

    #: ``None`` (default): IO goes through the Python methods. Or
    #: ``('null', {...})`` / ``('file', {...})``: the native core serves IO
    #: in C with those parameters and the Python IO methods are not called
    #: (``open``/``close`` still are). Typically set on the instance in
    #: ``open`` once parameters such as an fd are known.
    native_target: Any = None

    #: Capabilities, read once after :meth:`open`. The defaults are True iff
    #: the subclass overrides the matching method. Override with a class
    #: attribute, a property or an instance attribute.
    can_write = _Capability("write")
    can_flush = _Capability("flush")
    can_discard = _Capability("discard")
    #: If False but ``can_write`` is True the runner may emulate
    #: write_zeroes by writing zero-filled buffers.
    can_write_zeroes = _Capability("write_zeroes")
    #: True if :meth:`write` honours ``fua=True`` itself (data durable on
    #: return). If False the runner emulates FUA with write + flush (only
    #: when ``can_flush``).
    can_fua: bool = False

    #: Optional batch entry point, ``handle_batch(requests)``. ``None``
    #: (default) means "call the per-request methods". A batch-aware
    #: handler defines it as a method; the queue thread then passes every
    #: request fetched in one ring pass as a sequence of request objects
    #: (their type belongs to the native core, ``runner.ublk``) instead of
    #: calling read/write/...; the handler gives each request a result before
    #: returning, or returns an awaitable that does. Such a handler should set
    #: the ``can_*`` attributes explicitly (the defaults look at the
    #: per-request methods). Provisional: the request shape may still change
    #: within API 1.x.
    handle_batch: Any = None

    # -- configuration / lifecycle ----------------------------------------

    @classmethod
    def check_config(cls, options: dict[str, Any], device: DeviceSpec) -> None:
        """Cross-option checks beyond what :attr:`options_schema` can say.

        Called at config load time (also on SIGHUP reload), with validated
        options, on the control thread; must not touch the backend (no
        opening files or connecting). Raise :class:`ValueError` with a
        message saying what is wrong and what is expected; it is reported
        as a config error on the device's ``options``. Default: no checks.
        """

    @classmethod
    def open(cls, options: dict[str, Any], device: DeviceSpec) -> "Handler":
        """Open the backend for one device and return the handler instance.

        Args: ``options`` -- validated options (every schema key present);
        ``device`` -- the :class:`DeviceSpec`.
        Returns: an instance whose ``size`` (bytes, > 0, a multiple of
        ``logical_block_size``), block sizes and ``can_*`` are final.
        Errors: raise (``OSError`` preferred) to fail the device start; other
        devices are unaffected.
        Thread: control thread; may block.
        Default: ``cls(options, device)``.
        """
        return cls(options, device)

    def __init__(self, options: dict[str, Any], device: DeviceSpec):
        """Default constructor: keeps ``options``/``device`` and takes size
        and block sizes from the device spec. Subclasses that override it
        should call ``super().__init__(options, device)`` first and then set
        ``self.size`` etc. if they know better (``device.size`` may be
        ``None``)."""
        self.options = options
        self.device = device
        self.size: int | None = device.size
        self.logical_block_size: int = device.logical_block_size
        self.physical_block_size: int = device.physical_block_size

    def close(self) -> None:
        """Release the backend. Called once, after the last IO has
        completed, on the control thread; may block. Exceptions are logged
        and otherwise ignored. Default: nothing."""

    # -- IO ---------------------------------------------------------------

    def read(self, offset: int, buf: memoryview) -> Awaitable[None] | None:
        """Fill ``buf`` with ``len(buf)`` bytes of device data starting at
        byte ``offset``.

        ``buf`` is a writable memoryview into the request's IO buffer (no
        copy: write into it, e.g. ``f.readinto(buf)`` / ``os.preadv(fd,
        [buf], offset)``). It is only valid until the request completes;
        do not keep it. ``offset`` and ``len(buf)`` are multiples of
        ``logical_block_size`` and within ``size``.
        Returns ``None`` when done, or an awaitable that finishes the read.
        Errors: raise (``OSError(errno, ...)`` for a specific errno; anything
        else is EIO).
        Thread: a queue thread of the device (see :attr:`thread_model`). May
        block, which stalls only that queue; or return an awaitable.
        Required (unless :attr:`native_target` is set).
        """
        raise OSError(_errno.EOPNOTSUPP, "read not implemented")

    def write(self, offset: int, data: memoryview, fua: bool) -> Awaitable[None] | None:
        """Write ``data`` (a read-only memoryview, valid until the request
        completes) at byte ``offset``. If ``fua`` is true the data must be
        durable when the request completes (only passed as true when
        :attr:`can_fua`). ``offset``/``len(data)`` are multiples of
        ``logical_block_size``. Returns ``None`` or an awaitable. Never called
        on read-only devices or when ``can_write`` is false. Errors as for
        :meth:`read` (e.g. ``OSError(ENOSPC)``).
        Thread: a queue thread of the device (see :attr:`thread_model`). May
        block, which stalls only that queue; or return an awaitable.
        """
        raise OSError(_errno.EROFS, "handler is read-only")

    def flush(self) -> Awaitable[None] | None:
        """Make every completed write durable (the device has a volatile
        write cache when :attr:`can_flush`). Returns ``None`` or an
        awaitable. Only called when ``can_flush``. Errors as for
        :meth:`read`.
        Thread: a queue thread of the device (see :attr:`thread_model`). May
        block, which stalls only that queue; or return an awaitable.
        """
        raise OSError(_errno.EOPNOTSUPP, "flush not implemented")

    def discard(self, offset: int, length: int) -> Awaitable[None] | None:
        """Hint that ``length`` bytes at ``offset`` are unused (TRIM /
        UNMAP). Afterwards reads may return old data or zeros. Returns
        ``None`` or an awaitable. Only called when ``can_discard``. Errors as
        for :meth:`read`.
        Thread: a queue thread of the device (see :attr:`thread_model`). May
        block, which stalls only that queue; or return an awaitable.
        """
        raise OSError(_errno.EOPNOTSUPP, "discard not implemented")

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> Awaitable[None] | None:
        """Make ``length`` bytes at ``offset`` read back as zeros. If
        ``may_unmap`` the handler may deallocate the range instead of
        writing. Returns ``None`` or an awaitable. Raise
        ``OSError(EOPNOTSUPP)`` to make the runner fall back to writing
        zero buffers (when ``can_write``); other errors as for :meth:`read`.
        Thread: a queue thread of the device (see :attr:`thread_model`). May
        block, which stalls only that queue; or return an awaitable.
        """
        raise OSError(_errno.EOPNOTSUPP, "write_zeroes not implemented")


# --------------------------------------------------------------------------
# checks used by the registry and the runner


class HandlerContractError(TypeError):
    """A handler class or instance violates the contract."""


def check_handler_class(cls: Any) -> list[str]:
    """Problems with a handler class (empty list = acceptable). Used by the
    registry at ``registry.add()`` time."""
    if not isinstance(cls, type) or not issubclass(cls, Handler):
        return [f"{cls!r} is not a subclass of runner.handler.Handler"]
    problems = []
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not HANDLER_NAME_RE.match(name):
        problems.append(
            f"{cls.__qualname__}.name = {name!r} is not a valid handler name "
            f"(lower-case letters, digits, '-', '_'; starting with a letter; at most 64 characters)"
        )
    v = getattr(cls, "API_VERSION", None)
    if not (isinstance(v, tuple) and len(v) == 2 and all(type(x) is int for x in v)):
        problems.append(f"{cls.__qualname__}.API_VERSION = {v!r} must be a (major, minor) tuple of ints")
    elif v[0] != API_VERSION[0] or v[1] > API_VERSION[1]:
        problems.append(
            f"{cls.__qualname__} needs handler API {v[0]}.{v[1]}, "
            f"this runner provides {API_VERSION[0]}.{API_VERSION[1]}"
        )
    problems += [f"{cls.__qualname__}: {p}" for p in check_schema(getattr(cls, "options_schema", None))]
    if cls.thread_model not in THREAD_MODELS:
        problems.append(
            f"{cls.__qualname__}.thread_model = {cls.thread_model!r} (expected one of {', '.join(THREAD_MODELS)})"
        )
    nt = cls.__dict__.get("native_target", None)
    if nt is not None:
        problems += [f"{cls.__qualname__}.native_target: {p}" for p in _check_native(nt)]
    elif cls.read is Handler.read and cls.handle_batch is None and not _sets_native_later(cls):
        problems.append(f"{cls.__qualname__} must implement read() (or handle_batch, or set native_target)")
    return problems


def _sets_native_later(cls: type) -> bool:
    # A class may set native_target on the instance in open(); we cannot see
    # that statically, so only insist on read() when open() is not overridden.
    return cls.open.__func__ is not Handler.open.__func__


def _check_native(nt: Any) -> list[str]:
    if not (isinstance(nt, tuple) and len(nt) == 2 and isinstance(nt[1], Mapping)):
        return [f"{nt!r} must be None or a (target, params-dict) tuple"]
    if nt[0] not in NATIVE_TARGETS:
        return [f"unknown native target {nt[0]!r} (expected one of {', '.join(NATIVE_TARGETS)})"]
    return []


def check_instance(h: Any, device: DeviceSpec) -> dict[str, Any]:
    """Check an opened handler instance and return its effective geometry
    and capabilities (the runner calls this right after :meth:`Handler.open`)::

        {"size", "logical_block_size", "physical_block_size", "can_write",
         "can_flush", "can_fua", "can_discard", "can_write_zeroes",
         "native_target"}

    ``can_write`` is forced False for read-only devices. Raises
    :class:`HandlerContractError` naming what is wrong.
    """
    if not isinstance(h, Handler):
        raise HandlerContractError(f"open() returned {type(h).__name__}, not a Handler instance")
    who = f"handler {type(h).name!r} for device {device.name!r}"
    size = getattr(h, "size", None)
    lbs = getattr(h, "logical_block_size", None)
    pbs = getattr(h, "physical_block_size", None)
    if lbs not in (512, 1024, 2048, 4096):
        raise HandlerContractError(f"{who}: logical_block_size {lbs!r} (expected 512, 1024, 2048 or 4096)")
    if not (isinstance(pbs, int) and pbs >= lbs and pbs & (pbs - 1) == 0):
        raise HandlerContractError(
            f"{who}: physical_block_size {pbs!r} (expected a power of two >= logical_block_size {lbs})"
        )
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise HandlerContractError(
            f"{who}: size is {size!r} (the config gave no size, so open() must set self.size to the device size in bytes)"
        )
    if size % lbs:
        raise HandlerContractError(f"{who}: size {size} is not a multiple of logical_block_size {lbs}")
    nt = getattr(h, "native_target", None)
    if nt is not None:
        bad = _check_native(nt)
        if bad:
            raise HandlerContractError(f"{who}: native_target {bad[0]}")
    caps = {c: bool(getattr(h, c)) for c in ("can_write", "can_flush", "can_fua", "can_discard", "can_write_zeroes")}
    if device.read_only:
        caps["can_write"] = False
    if not caps["can_write"]:
        caps["can_fua"] = caps["can_write_zeroes"] = False
    if h.thread_model not in THREAD_MODELS:
        raise HandlerContractError(f"{who}: thread_model {h.thread_model!r}")
    return {
        "size": size,
        "logical_block_size": lbs,
        "physical_block_size": pbs,
        **caps,
        "native_target": nt,
    }


def errno_of(exc: BaseException) -> int:
    """The errno a failed request completes with: ``exc.errno`` for an
    :class:`OSError` that carries a positive one, else ``EIO``."""
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        return exc.errno
    return _errno.EIO
