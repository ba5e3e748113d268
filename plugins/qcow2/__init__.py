"""qcow2 plugin: a pure-Python qcow2 v2/v3 read/write engine and the ``qcow2`` handler."""

from runner.hookspecs import hookimpl

from .engine import Qcow2Error, Qcow2Image, create

__all__ = ["Qcow2Error", "Qcow2Image", "create"]


@hookimpl
def ublk_runner_register_handlers(registry):
    from .handler import Qcow2Handler
    registry.add(Qcow2Handler)


@hookimpl
def ublk_runner_add_commands(subparsers):
    from .cli import add_commands
    add_commands(subparsers)
