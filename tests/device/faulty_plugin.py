"""A test plugin (loaded with --plugin tests.device.faulty_plugin): an in-memory handler whose
reads fail with an exception at one chosen offset."""
import asyncio
import os
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


class Crashy(Handler):
    """In-memory (kept in ``store``, a file, so a restarted worker sees the data); the first
    read covering ``crash_offset`` kills the process: ``how: exit`` (os._exit), ``segv`` (a
    NULL read through ctypes) or ``hang`` (blocks forever in place). A ``marker`` file makes it
    happen once, so the reissued request succeeds in the restarted worker."""
    name = "crashy"
    size_required = True
    thread_model = "parallel"
    idempotent_writes = True
    options_schema = {"crash_offset": Opt(int, required=True), "marker": Opt(str, required=True),
                      "store": Opt(str, required=True),
                      "how": Opt(str, required=True, choices=["exit", "segv", "hang"])}

    def __init__(self, options, device):
        super().__init__(options, device)
        self.fd = os.open(options["store"], os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, device.size)

    def read(self, offset, buf):
        o = self.options
        if offset <= o["crash_offset"] < offset + len(buf) and not os.path.exists(o["marker"]):
            open(o["marker"], "w").close()
            if o["how"] == "exit":
                os._exit(7)
            if o["how"] == "segv":
                import ctypes
                ctypes.string_at(0)
            threading.Event().wait()
        os.preadv(self.fd, [buf], offset)

    def write(self, offset, data, fua):
        os.pwrite(self.fd, data, offset)

    def close(self):
        os.close(self.fd)


@hookimpl(specname="ublk_runner_register_handlers")
def register_crashy(registry):
    registry.add(Crashy)


class OneThreadAsync(Handler):
    """asyncio, in memory, ``thread_model = "serialize"`` (the default): fails every request that
    enters it from a second thread, which the runner promises never happens however many queues
    the device has.  ``write_zeroes`` says EOPNOTSUPP, so the runner writes zeros instead."""
    name = "one-thread-async"
    size_required = True

    def __init__(self, options, device):
        super().__init__(options, device)
        self.mem = bytearray(device.size)
        self.thread = None

    def _enter(self):
        me = threading.get_ident()
        if self.thread is None:
            self.thread = me
        elif self.thread != me:
            raise OSError(5, "entered from a second thread")

    async def read(self, offset, buf):
        self._enter()
        await asyncio.sleep(0)
        buf[:] = self.mem[offset:offset + len(buf)]

    async def write(self, offset, data, fua):
        self._enter()
        self.mem[offset:offset + len(data)] = data
        await asyncio.sleep(0)

    async def write_zeroes(self, offset, length, may_unmap):
        self._enter()
        raise OSError(95, "no native write-zeroes")


@hookimpl(specname="ublk_runner_register_handlers")
def register_one_thread(registry):
    registry.add(OneThreadAsync)
