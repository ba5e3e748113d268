"""ublk-runner plugin providing the ``sample-mem`` handler: an in-memory disk.

The plugin is this module; it is found through the entry point
``sample = "ublk_sample_handler"`` in the group ``ublk_runner``.
"""

from __future__ import annotations

from runner.handler import DeviceSpec, Handler, Opt
from runner.hookspecs import hookimpl

__version__ = "0.1.0"


class SampleMem(Handler):
    """A RAM disk backed by a ``bytearray``. Needs ``size:`` in the config."""

    name = "sample-mem"
    API_VERSION = (1, 0)
    size_required = True
    thread_model = "serialize"
    options_schema = {
        "fill": Opt(int, default=0, min=0, max=255, help="byte value the disk starts filled with"),
    }

    def __init__(self, options: dict, device: DeviceSpec):
        super().__init__(options, device)
        self.data = bytearray([options["fill"]]) * device.size

    def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset : offset + len(buf)]

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.data[offset : offset + len(data)] = data

    def flush(self) -> None:
        pass  # nothing volatile

    def discard(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self.data[offset : offset + length] = bytes(length)

    def close(self) -> None:
        self.data = bytearray()


@hookimpl
def ublk_runner_register_handlers(registry):
    registry.add(SampleMem)
