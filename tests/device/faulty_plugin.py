"""A test plugin (loaded with --plugin tests.device.faulty_plugin): an in-memory handler whose
reads fail with an exception at one chosen offset."""
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
