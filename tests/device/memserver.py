"""An in-memory backend for the device tests, served through the library in several ways:

- "thread":  each queue's own thread completes requests inline;
- "remote":  each queue's thread hands requests to a pool, whose threads complete them;
- "asyncio": one event loop in one thread serves every queue.
Every request is recorded (op, offset, length, flags) so tests can check what the kernel sent.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading

from runner import aio
from runner.queue import OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE, OP_WRITE_ZEROES, QueueStopped
from runner.ublk import Device


class MemServer:
    def __init__(self, size=64 << 20, queues=1, mode="thread", **add_kw):
        self.size = size
        self.mem = memoryview(bytearray(size))
        self.mode = mode
        self.log: list[tuple] = []
        self.log_lock = threading.Lock()
        self.dev = Device.add(size, queues=queues, **add_kw)
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.pool = concurrent.futures.ThreadPoolExecutor(4) if mode == "remote" else None

    # one request, whatever thread runs it
    def serve_one(self, q, r):
        with self.log_lock:
            self.log.append((r.op, r.offset, r.length, r.op_flags >> 8 << 8))
        span = self.mem[r.offset:r.offset + r.length]
        if r.op == OP_READ:
            q.complete(r, r.length, data=span)
        elif r.op == OP_WRITE:
            q.complete(r, q.read_data(r, span))
        elif r.op in (OP_DISCARD, OP_WRITE_ZEROES):
            span[:] = bytes(r.length)
            q.complete(r, 0)
        elif r.op == OP_FLUSH:
            q.complete(r, 0)
        else:
            q.complete(r, -95)

    def _thread_main(self, q_id, ready):
        try:
            with self.dev.open_queue(q_id, pollable=False) as q:
                ready.set()
                while True:
                    for r in q.wait(1.0):
                        if self.pool:
                            self.pool.submit(self.serve_one, q, r)
                        else:
                            self.serve_one(q, r)
        except QueueStopped:
            pass
        except BaseException as e:  # surfaced by stop()
            self.errors.append(e)
            ready.set()

    def _asyncio_main(self, ready):
        async def handle(q, r):
            self.serve_one(q, r)

        async def main():
            queues = [self.dev.open_queue(i) for i in range(self.dev.info.nr_queues)]
            servers = [asyncio.ensure_future(aio.serve(q, handle)) for q in queues]
            await aio.start(self.dev)
            ready.set()
            await asyncio.gather(*servers)
            for q in queues:
                q.close()

        try:
            asyncio.run(main())
        except BaseException as e:
            self.errors.append(e)
            ready.set()

    def start(self):
        if self.mode == "asyncio":
            ready = threading.Event()
            t = threading.Thread(target=self._asyncio_main, args=(ready,), daemon=True)
            t.start()
            self.threads.append(t)
            assert ready.wait(60), "asyncio server did not start"
        else:
            for q_id in range(self.dev.info.nr_queues):
                ready = threading.Event()
                t = threading.Thread(target=self._thread_main, args=(q_id, ready), daemon=True)
                t.start()
                self.threads.append(t)
                assert ready.wait(30)
            self.dev.start()
        if self.errors:
            raise self.errors[0]
        return self

    def stop(self):
        self.dev.stop()
        for t in self.threads:
            t.join(30)
            assert not t.is_alive(), "queue thread did not exit after STOP_DEV"
        if self.pool:
            self.pool.shutdown()
        self.dev.delete()
        if self.errors:
            raise self.errors[0]

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.dev.close()
            raise

    def __exit__(self, *exc):
        self.stop()
