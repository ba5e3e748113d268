"""RBD handler plugin (ublk_plugins.rbd).

The librbd backend lives in :mod:`.backend`; it is imported lazily so that loading this
package does not require Debian's python3-rbd/python3-rados to be installed.
"""


def __getattr__(name):
    if name in ("RbdBackend", "RbdError", "SyncRbd"):
        from . import backend
        return getattr(backend, name)
    raise AttributeError(name)
