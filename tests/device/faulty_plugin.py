"""A test plugin (loaded with --plugin tests.device.faulty_plugin): an in-memory handler whose
reads fail with an exception at one chosen offset."""
import asyncio
import concurrent.futures
import threading

from runner.handler import Handler, Opt
from runner.hookspecs import hookimpl


class Faulty(Handler):
    name = "faulty"
    size_required = True
    options_schema = {"bad_offset": Opt(int, required=True)}

    def __init__(self, options, device):
        super().__init__(options, device)
        self.mem = bytearray(device.size)

    def read(self, offset, buf):
        if offset <= self.options["bad_offset"] < offset + len(buf):
            raise RuntimeError("simulated backend failure")
        buf[:] = self.mem[offset:offset + len(buf)]

    def write(self, offset, data, fua):
        self.mem[offset:offset + len(data)] = data


@hookimpl
def ublk_runner_register_handlers(registry):
    registry.add(Faulty)


class Hanging(Handler):
    """In-memory; a read covering ``hang_offset`` never finishes (until close): in place
    (``style: sync``) or as a Future nobody resolves (``future``)."""
    name = "hanging"
    size_required = True
    thread_model = "parallel"
    options_schema = {"hang_offset": Opt(int, required=True),
                      "style": Opt(str, default="future", choices=["sync", "future"])}

    def __init__(self, options, device):
        super().__init__(options, device)
        self.mem = bytearray(device.size)
        self.release = threading.Event()
        self.pending = []

    def _hangs(self, offset, buf):
        return offset <= self.options["hang_offset"] < offset + len(buf)

    def read(self, offset, buf):
        if self._hangs(offset, buf):
            if self.options["style"] == "sync":
                self.release.wait()
            else:
                f = concurrent.futures.Future()
                self.pending.append(f)
                return f
        buf[:] = self.mem[offset:offset + len(buf)]

    def write(self, offset, data, fua):
        self.mem[offset:offset + len(data)] = data

    def close(self):
        self.release.set()
        for f in self.pending:
            f.set_result(None)  # late: the runner must drop it


class HangingAsync(Handler):
    """The asyncio flavour: ``async def`` methods; the read at ``hang_offset`` awaits forever."""
    name = "hanging-async"
    size_required = True
    options_schema = {"hang_offset": Opt(int, required=True)}

    def __init__(self, options, device):
        super().__init__(options, device)
        self.mem = bytearray(device.size)

    async def read(self, offset, buf):
        if offset <= self.options["hang_offset"] < offset + len(buf):
            await asyncio.Event().wait()
        buf[:] = self.mem[offset:offset + len(buf)]

    async def write(self, offset, data, fua):
        self.mem[offset:offset + len(data)] = data


@hookimpl(specname="ublk_runner_register_handlers")
def register_hanging(registry):
    registry.add(Hanging)
    registry.add(HangingAsync)
