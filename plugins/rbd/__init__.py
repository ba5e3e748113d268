"""RBD handler plugin (ublk_plugins.rbd): a Ceph RBD image as a ublk device.

The handler is :class:`.handler.RbdHandler` (``handler: rbd``); the librbd backend lives in
:mod:`.backend`. librbd is imported only when a device opens, so loading this plugin does not
require Debian's python3-rbd/python3-rados.
"""
from runner.hookspecs import hookimpl

from .handler import RbdHandler


def __getattr__(name):
    if name in ("RbdBackend", "RbdError", "SyncRbd"):
        from . import backend
        return getattr(backend, name)
    raise AttributeError(name)


@hookimpl
def ublk_runner_register_handlers(registry):
    registry.add(RbdHandler)
