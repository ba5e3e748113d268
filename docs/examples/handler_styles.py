"""The three ways a handler's IO methods can finish a request, side by side.

Each class is a complete handler over a ``bytearray`` (with ``size:`` from the
config). They differ only in *when* a request completes:

- ``SyncMem``: the method returns ``None``; the request completes when it
  returns. Simple; a slow call stalls its queue.
- ``AsyncDelayMem``: ``async def`` methods; each queue thread runs an asyncio
  event loop and every request is a task, so one queue has many requests in
  flight while they await.
- ``PoolMem``: the method returns a ``concurrent.futures.Future`` and
  returns at once; the request completes when the future resolves, on
  whichever thread resolves it.

They are registered by the plugin function at the end, like any other.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time

from runner.handler import Handler, Opt
from runner.hookspecs import hookimpl


class SyncMem(Handler):
    name = "styles-sync"
    size_required = True

    def __init__(self, options, device):
        super().__init__(options, device)
        self.data = bytearray(device.size)

    def read(self, offset, buf):
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, offset, data, fua):
        self.data[offset:offset + len(data)] = data


class AsyncDelayMem(Handler):
    """Every request waits ``delay_ms`` without blocking its queue."""
    name = "styles-async"
    size_required = True
    options_schema = {"delay_ms": Opt(float, default=1.0, min=0, help="added latency per request")}

    def __init__(self, options, device):
        super().__init__(options, device)
        self.data = bytearray(device.size)
        self.delay = options["delay_ms"] / 1000

    # In an asyncio handler EVERY IO method it implements must be `async def`.
    async def read(self, offset, buf):
        await asyncio.sleep(self.delay)
        buf[:] = self.data[offset:offset + len(buf)]

    async def write(self, offset, data, fua):
        await asyncio.sleep(self.delay)
        self.data[offset:offset + len(data)] = data   # copy before returning: `data` dies with the request


class PoolMem(Handler):
    """Work runs on a thread pool; stands in for a client library with callbacks."""
    name = "styles-future"
    size_required = True
    thread_model = "parallel"      # our pool calls us from several threads anyway

    def __init__(self, options, device):
        super().__init__(options, device)
        self.data = bytearray(device.size)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="poolmem")

    def _read(self, offset, buf):
        time.sleep(0.001)                       # a slow backend
        buf[:] = self.data[offset:offset + len(buf)]

    def _write(self, offset, data):
        time.sleep(0.001)
        self.data[offset:offset + len(data)] = data

    def read(self, offset, buf):
        return self.pool.submit(self._read, offset, buf)       # fill buf, then resolve

    def write(self, offset, data, fua):
        return self.pool.submit(self._write, offset, data)

    def close(self):
        self.pool.shutdown(wait=True)


@hookimpl
def ublk_runner_register_handlers(registry):
    for cls in (SyncMem, AsyncDelayMem, PoolMem):
        registry.add(cls)
