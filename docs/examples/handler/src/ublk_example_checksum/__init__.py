"""ublk-runner plugin: registers the ``checksum-mem`` handler.

This module is the plugin object. The runner imports it through the entry
point ``checksum = "ublk_example_checksum"`` (group ``ublk_runner``) and calls
the hook below once, at start-up, on its main thread.
"""
from runner.hookspecs import hookimpl

from .handler import ChecksumMem

__version__ = "1.0.0"
__all__ = ["ChecksumMem", "ublk_runner_register_handlers"]


@hookimpl
def ublk_runner_register_handlers(registry):
    registry.add(ChecksumMem)
