"""Plugin hook specifications for ublk-runner (pluggy project ``ublk_runner``).

A plugin is a module (or object) exposing functions marked with
:data:`hookimpl`, made discoverable by an entry point in the group
``ublk_runner``::

    # pyproject.toml of a plugin distribution
    [project.entry-points."ublk_runner"]
    mybackend = "mybackend_ublk.plugin"

    # mybackend_ublk/plugin.py
    from runner.hookspecs import hookimpl   # or pluggy.HookimplMarker("ublk_runner")

    @hookimpl
    def ublk_runner_register_handlers(registry):
        registry.add(MyBackendHandler)

Hooks are for registration and lifecycle only -- **never per IO** (a hook
call costs ~1 µs). Per-IO work goes through the handler instance's methods
(:mod:`runner.handler`).

Compatibility: specs only ever gain keyword arguments; an implementation may
accept any subset of a spec's arguments (pluggy checks this at
registration). Deprecations go through ``warn_on_impl``/``warn_on_impl_args``.
A plugin's failure in any hook is logged with its name and distribution and
does not affect other plugins.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "ublk_runner"
#: Entry-point group plugins register under.
ENTRYPOINT_GROUP = "ublk_runner"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorator for plugin hook implementations.
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def ublk_runner_register_handlers(registry: Any) -> None:
    """Register handler classes.

    Call ``registry.add(HandlerClass)`` for each :class:`runner.handler.Handler`
    subclass the plugin provides. Called once, on the control thread, after
    all plugins are loaded and before the config is validated. The registry
    checks each class when it is added (name valid and unused, API major
    version, option schema) and raises :class:`runner.plugins.RegistryError`
    on a problem; if this hook raises, every handler the plugin added in this
    call is withdrawn and the error is reported with the plugin's name.
    The return value is ignored.
    """


@hookspec
def ublk_runner_device_started(device: Any) -> None:
    """A device is live (``/dev/ublkbN`` exists and serves IO).

    ``device`` is the runner's device object (it has at least ``name``,
    ``config`` -- the :class:`runner.config.DeviceConfig` -- and ``dev_id``).
    Called on the control thread; keep it short (it delays the next device's
    start). Exceptions are logged and ignored. The return value is ignored.
    """


@hookspec
def ublk_runner_device_stopped(device: Any) -> None:
    """A device has been stopped and its handler closed (also after a
    failure). Same ``device`` object and rules as
    :func:`ublk_runner_device_started`.
    """


@hookspec
def ublk_runner_add_commands(subparsers: Any) -> None:
    """Add subcommands to the ``ublk-runner`` command line.

    ``subparsers`` is the ``argparse`` sub-parsers action of ``ublk-runner``:
    call ``subparsers.add_parser(NAME, help=...)`` and give each command a
    ``func`` default, ``parser.set_defaults(func=f)``, where ``f(args)``
    returns the exit status. ``f`` may raise :class:`RuntimeError` with a
    message for the user (printed as ``ublk-runner: MESSAGE``, exit status 1).
    Name the command after the plugin (the ``qcow2`` plugin adds ``ublk-runner
    qcow2 ...``); a name that is already taken is refused with a warning and
    the rest of the command line works on. Called on every invocation, with
    the plugins found through entry points (``UBLK_RUNNER_DISABLE_PLUGIN_AUTOLOAD=1``
    turns them off), before arguments are parsed, so import what the commands need
    inside ``f``, not in the hook. The return value is ignored.
    """
