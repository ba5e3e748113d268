"""Plugin loading and the handler registry.

Load order (like tox): the runner's own plugins (``null``, ``file``, shipped
by the ``ublk-runner`` distribution as ordinary entry points) first, then
every other distribution's entry points in the group ``ublk_runner``
(sorted by distribution then entry-point name, so the order does not depend
on ``sys.path`` layout), then explicitly named plugins, then
``check_pending()``, then the ``ublk_runner_register_handlers`` hook, one
plugin at a time.

Isolation: a plugin that fails to import, fails pluggy's validation,
implements an unknown hook, or raises in ``ublk_runner_register_handlers``
is logged (entry-point name, distribution and version) and recorded in
:attr:`Plugins.errors`; its handlers are withdrawn and the other plugins are
unaffected. We therefore walk the entry points ourselves instead of calling
``PluginManager.load_setuptools_entrypoints``, which aborts on the first
import error and can leave a half-registered plugin behind; the walk is the
same (``importlib.metadata.distributions()``, skip already registered or
blocked names).

Disabling: ``UBLK_RUNNER_DISABLE_PLUGIN_AUTOLOAD=1`` (or ``autoload=False``,
or ``plugins: {autoload: false}`` in the config) skips the entry-point walk;
plugins named in ``extra`` (the CLI's ``--plugin NAME``) are still loaded --
an entry-point name (``null``) or an importable module name
(``mypkg.plugin``). ``block`` names plugins (entry-point names) never to
load, even if named in ``extra``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import logging
import os
import re
import traceback
from typing import Any, Iterable, Iterator

import pluggy

from . import hookspecs
from .handler import Handler, check_handler_class

__all__ = [
    "ENV_DISABLE_AUTOLOAD",
    "HandlerRegistry",
    "PluginFailure",
    "PluginInfo",
    "Plugins",
    "RegistryError",
    "load_plugins",
]

log = logging.getLogger("ublk_runner.plugins")

ENV_DISABLE_AUTOLOAD = "UBLK_RUNNER_DISABLE_PLUGIN_AUTOLOAD"
#: Distribution whose entry points are loaded first (the built-in handlers).
RUNNER_DISTRIBUTION = "ublk-runner"


def _norm(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


class RegistryError(ValueError):
    """A handler class was refused by :meth:`HandlerRegistry.add`."""


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin, as shown by ``ublk-runner plugins``."""

    name: str  #: entry-point (plugin) name
    module: str  #: module the plugin object comes from
    distribution: str | None  #: distribution name, None for plugins loaded by module name
    version: str | None  #: distribution version
    handlers: tuple[str, ...]  #: handler names this plugin registered


@dataclasses.dataclass(frozen=True)
class PluginFailure:
    """A plugin that was skipped."""

    name: str
    distribution: str | None
    version: str | None
    stage: str  #: 'import', 'register' (pluggy validation / unknown hook), 'hook', 'duplicate'
    message: str
    traceback: str = ""

    def __str__(self) -> str:
        return f"plugin {self.name!r}{_dist_label(self.distribution, self.version)}: {self.message}"


def _dist_label(dist: str | None, version: str | None) -> str:
    if not dist:
        return ""
    return f" (distribution {dist} {version})" if version else f" (distribution {dist})"


class HandlerRegistry:
    """Handler classes by name. Passed to ``ublk_runner_register_handlers``.

    :meth:`add` checks each class immediately: subclass of
    :class:`runner.handler.Handler`, valid unused ``name``, ``API_VERSION``
    compatible with this runner, well-formed ``options_schema``, a
    ``read()``. The config layer only needs :meth:`get` and :meth:`names`.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, type[Handler]] = {}
        self._owner: dict[str, tuple[str | None, str | None, str | None]] = {}
        self._current: tuple[str | None, str | None, str | None] = (None, None, None)

    # -- used by plugins ---------------------------------------------------

    def add(self, cls: type[Handler]) -> type[Handler]:
        """Register ``cls`` under ``cls.name``; returns ``cls`` (so it also
        works as a class decorator). Raises :class:`RegistryError`."""
        plugin, dist, version = self._current
        who = f"plugin {plugin!r}{_dist_label(dist, version)}" if plugin else "handler registration"
        problems = check_handler_class(cls)
        if problems:
            raise RegistryError(f"{who}: " + "; ".join(problems))
        name = cls.name
        if name in self._handlers:
            o_plugin, o_dist, o_version = self._owner[name]
            other = (
                f"plugin {o_plugin!r}{_dist_label(o_dist, o_version)}" if o_plugin else "an earlier registration"
            )
            raise RegistryError(
                f"{who}: handler name {name!r} ({cls.__module__}.{cls.__qualname__}) is already "
                f"registered by {other} ({self._handlers[name].__module__}.{self._handlers[name].__qualname__})"
            )
        self._handlers[name] = cls
        self._owner[name] = self._current
        return cls

    # -- used by the runner ------------------------------------------------

    def get(self, name: str) -> type[Handler] | None:
        return self._handlers.get(name)

    def __getitem__(self, name: str) -> type[Handler]:
        return self._handlers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._handlers))

    def __len__(self) -> int:
        return len(self._handlers)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def owner(self, name: str) -> tuple[str | None, str | None, str | None]:
        """``(plugin name, distribution, version)`` that registered ``name``."""
        return self._owner[name]

    def handlers_of(self, plugin: str) -> tuple[str, ...]:
        return tuple(n for n in self._handlers if self._owner[n][0] == plugin)

    @contextlib.contextmanager
    def adding_for(self, plugin: str | None, dist: str | None = None, version: str | None = None) -> Iterator[None]:
        """Attribute the enclosed :meth:`add` calls to ``plugin``; if the
        block raises, withdraw everything it added."""
        before = set(self._handlers)
        saved = self._current
        self._current = (plugin, dist, version)
        try:
            yield
        except BaseException:
            for n in set(self._handlers) - before:
                del self._handlers[n]
                del self._owner[n]
            raise
        finally:
            self._current = saved


class Plugins:
    """The plugin manager, the handler registry and what happened while
    loading. Create with :func:`load_plugins`."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registry = HandlerRegistry()
        #: Plugins that were skipped, in the order it happened.
        self.errors: list[PluginFailure] = []
        self._dist: dict[str, tuple[str | None, str | None]] = {}

    @property
    def hook(self) -> Any:
        return self.pm.hook

    # -- loading -----------------------------------------------------------

    def _fail(self, name: str, dist: str | None, version: str | None, stage: str, exc: BaseException | str) -> None:
        if isinstance(exc, BaseException):
            if isinstance(exc, RegistryError):
                msg = str(exc)
                prefix = f"plugin {name!r}{_dist_label(dist, version)}: "
                if msg.startswith(prefix):
                    msg = msg[len(prefix):]
            else:
                msg = f"{type(exc).__name__}: {exc}"
            tb = "".join(traceback.format_exception(exc))
        else:
            msg, tb = exc, ""
        f = PluginFailure(name, dist, version, stage, msg, tb)
        self.errors.append(f)
        verb = {
            "import": "failed to import",
            "register": "was rejected",
            "hook": "failed to register its handlers",
            "duplicate": "was skipped",
        }[stage]
        log.error("plugin %r%s %s and is skipped: %s", name, _dist_label(dist, version), verb, msg)
        if tb:
            log.debug("%s", tb)

    def register_plugin(self, obj: Any, name: str, dist: str | None = None, version: str | None = None) -> bool:
        """Register one plugin object (module) under ``name``; on any pluggy
        validation error, or a hook implementation without a spec (unless
        ``optionalhook``), undo and record the failure. Returns success."""
        try:
            if self.pm.register(obj, name=name) is None:
                return False  # blocked
            for hc in self.pm.get_hookcallers(obj) or ():
                if hc.has_spec():
                    continue
                for impl in hc.get_hookimpls():
                    if impl.plugin is obj and not impl.optionalhook:
                        raise pluggy.PluginValidationError(obj, f"unknown hook {hc.name!r}")
        except Exception as e:
            if self.pm.get_plugin(name) is obj:
                self.pm.unregister(name=name)
            self._fail(name, dist, version, "register", e)
            return False
        self._dist[name] = (dist, version)
        return True

    def _load_entry_point(self, ep: importlib.metadata.EntryPoint, dist: str | None, version: str | None) -> None:
        if self.pm.is_blocked(ep.name):
            log.info("plugin %r%s is blocked", ep.name, _dist_label(dist, version))
            return
        if self.pm.has_plugin(ep.name):
            odist, over = self._dist.get(ep.name, (None, None))
            if (odist, over) != (dist, version):
                owner = f"distribution {odist} {over}" if odist else f"the module loaded as {ep.name!r}"
                self._fail(
                    ep.name, dist, version, "duplicate",
                    f"entry-point name {ep.name!r} is already taken by {owner}",
                )
            return
        try:
            obj = ep.load()
        except BaseException as e:  # noqa: BLE001 -- a plugin must never take the runner down
            if isinstance(e, KeyboardInterrupt):
                raise
            self._fail(ep.name, dist, version, "import", e)
            return
        self.register_plugin(obj, ep.name, dist, version)

    def _load_module(self, modname: str) -> None:
        if self.pm.is_blocked(modname):
            log.warning("plugin %r is blocked; not loading it", modname)
            return
        if self.pm.has_plugin(modname):
            return
        try:
            obj = importlib.import_module(modname)
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            self._fail(modname, None, None, "import", e)
            return
        self.register_plugin(obj, modname)

    def load(self, autoload: bool = True, block: Iterable[str] = (), extra: Iterable[str] = ()) -> None:
        for name in block:
            self.pm.set_blocked(name)
        eps = entry_points()
        if autoload:
            for ep, dist, version in eps:
                self._load_entry_point(ep, dist, version)
        by_name: dict[str, list] = {}
        for item in eps:
            by_name.setdefault(item[0].name, []).append(item)
        for name in extra:
            if name in by_name:
                for ep, dist, version in by_name[name]:
                    self._load_entry_point(ep, dist, version)
            else:
                self._load_module(name)
        self.pm.check_pending()  # cannot fail: register_plugin refused unknown hooks already
        self._register_handlers()

    # -- calling hooks -----------------------------------------------------

    def _impls_in_order(self, hook_name: str) -> list[Any]:
        hc = getattr(self.pm.hook, hook_name)
        order = {name: i for i, (name, _) in enumerate(self.pm.list_name_plugin())}

        def key(impl: Any) -> tuple[int, int]:
            rank = 0 if impl.tryfirst else 2 if impl.trylast else 1
            return rank, order.get(impl.plugin_name, 1 << 30)

        return sorted(hc.get_hookimpls(), key=key)

    def _call_one(self, hook_name: str, plugin_name: str, kwargs: dict[str, Any]) -> Any:
        others = [p for n, p in self.pm.list_name_plugin() if p is not None and n != plugin_name]
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)

    def _register_handlers(self) -> None:
        done = set()
        for impl in self._impls_in_order("ublk_runner_register_handlers"):
            name = impl.plugin_name
            if name in done:
                continue
            done.add(name)
            dist, version = self._dist.get(name, (None, None))
            try:
                with self.registry.adding_for(name, dist, version):
                    self._call_one("ublk_runner_register_handlers", name, {"registry": self.registry})
            except Exception as e:
                self._fail(name, dist, version, "hook", e)

    def call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, BaseException]]:
        """Call a hook on every plugin in load order, each on its own, so
        one plugin's exception does not stop the others. Results are
        discarded; returns ``(plugin name with distribution, exception)``
        for each plugin that raised."""
        done, failed = set(), []
        for impl in self._impls_in_order(hook_name):
            name = impl.plugin_name
            if name in done:
                continue
            done.add(name)
            try:
                self._call_one(hook_name, name, kwargs)
            except Exception as e:
                dist, version = self._dist.get(name, (None, None))
                failed.append((f"{name!r}{_dist_label(dist, version)}", e))
        return failed

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call a lifecycle hook (``ublk_runner_device_started``, ...) with
        :meth:`call_each`, logging each plugin's exception."""
        for plugin, exc in self.call_each(hook_name, **kwargs):
            log.error("plugin %s raised in %s", plugin, hook_name, exc_info=exc)

    # -- introspection -----------------------------------------------------

    def list_plugins(self) -> list[PluginInfo]:
        """Loaded plugins in load order: name, module, distribution,
        version, handler names (for ``ublk-runner plugins``). Failures are
        in :attr:`errors`."""
        out = []
        for name, obj in self.pm.list_name_plugin():
            if obj is None:
                continue
            dist, version = self._dist.get(name, (None, None))
            out.append(
                PluginInfo(
                    name=name,
                    module=getattr(obj, "__name__", type(obj).__name__),
                    distribution=dist,
                    version=version,
                    handlers=self.registry.handlers_of(name),
                )
            )
        return out


def entry_points(group: str = hookspecs.ENTRYPOINT_GROUP) -> list[tuple[importlib.metadata.EntryPoint, str, str]]:
    """``(entry point, distribution name, version)`` for ``group``: the
    runner's own distribution first, then the rest sorted by normalized
    distribution name and entry-point name. A distribution seen twice on
    ``sys.path`` counts once (the first one, as the import system would)."""
    seen: set[tuple[str, str]] = set()
    found = []
    for dist in importlib.metadata.distributions():
        dname = dist.metadata["Name"] or "?"
        for ep in dist.entry_points:
            if ep.group != group:
                continue
            k = (_norm(dname), ep.name)
            if k in seen:
                continue
            seen.add(k)
            found.append((ep, dname, dist.version))
    found.sort(key=lambda t: (_norm(t[1]) != RUNNER_DISTRIBUTION, _norm(t[1]), t[0].name))
    return found


def autoload_disabled_by_env() -> bool:
    return os.environ.get(ENV_DISABLE_AUTOLOAD, "").strip().lower() not in ("", "0", "false", "no")


def load_plugins(autoload: bool = True, block: Iterable[str] = (), extra: Iterable[str] = ()) -> Plugins:
    """Load plugins and register their handlers; see the module docstring.

    ``autoload`` -- walk the ``ublk_runner`` entry points (forced off by
    ``UBLK_RUNNER_DISABLE_PLUGIN_AUTOLOAD=1``); ``block`` -- plugin names
    never to load; ``extra`` -- plugin names to load in any case
    (entry-point names or module names). Never raises because of a plugin;
    see :attr:`Plugins.errors`.
    """
    p = Plugins()
    p.load(autoload=autoload and not autoload_disabled_by_env(), block=block, extra=extra)
    return p
