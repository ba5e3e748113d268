"""Serve one configured device: open its handler, create the ublk device, run one thread per
queue that calls the handler's IO methods, and take it all down again.

Request paths, chosen once when the device starts:

- native (``handler.native_target``): the core serves every request; the queue thread only
  drives the ring and Python never sees a request;
- sync: the queue thread calls ``read``/``write``/... in place; a method may instead return a
  ``concurrent.futures.Future`` (or anything with ``add_done_callback``) that its own library
  resolves later on any thread, and the core hands that completion back to the queue thread;
  or, when the handler's ``attach_queue(queue)`` returns a submitter, each batch goes to its
  native code in one call and Python never sees a request (``DeviceServer._serve_native``);
- forward (sync path, handler sets ``forward_fd``): before a READ/WRITE is served in Python the
  handler's ``forward(op, offset, length, fua)`` may return an offset in that file; the core then
  does the IO and commits, and ``forwarded(list)`` later tells the handler which finished;
- asyncio: when the handler's IO methods are coroutine functions, an event loop serves the
  queues and every request is a task (:func:`runner.aio.serve`): one loop thread for all queues
  with thread_model "serialize", one per queue with "parallel".
"""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import inspect
import logging
import mmap
import os
import signal
import threading
import time

from .handler import Handler, check_instance, errno_of
from .queue import (F_FUA, OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE, OP_WRITE_ZEROES, Queue,
                    QueueStopped, Request)
from .ublk import Device

log = logging.getLogger("ublk_runner.server")

IO_METHODS = ("read", "write", "flush", "discard", "write_zeroes")


class DeviceFailed(Exception):
    """A device could not be started; the message names the device and the cause."""


class _Buffers:
    """Per-tag, page-aligned IO buffers (O_DIRECT-safe), grown on demand; user-copy mode only."""

    def __init__(self, depth: int):
        self._maps: list[mmap.mmap | None] = [None] * depth

    def get(self, tag: int, length: int) -> memoryview:
        m = self._maps[tag]
        if m is None or len(m) < length:
            m = self._maps[tag] = mmap.mmap(-1, max(length, 4096))
        return memoryview(m)[:length]

    def retire(self, tag: int) -> None:
        """The handler may still write into this tag's buffer (its request timed out): give the
        tag's next request a fresh one; the old one lives until the handler lets go of it."""
        self._maps[tag] = None


class _Tracker:
    """The requests of one queue that are in the handler's hands, so that the watchdog can fail
    those past the deadline.  A request is finished by whoever first pops its cell (a one-item
    list; ``list.pop`` is atomic): the handler's completion or the watchdog, never both, and a
    late completion can never reach the tag's next request."""

    __slots__ = ("q", "bufs", "cells", "starts", "heartbeat", "stalled")

    def __init__(self, q: Queue, bufs: _Buffers | None):
        self.q = q
        self.bufs = bufs
        self.cells: list[list | None] = [None] * q.depth
        self.starts = [0.0] * q.depth
        self.heartbeat = time.monotonic()  # the queue thread's last pass through its loop
        self.stalled = False

    def track(self, r: Request, now: float) -> list:
        cell = [r]
        self.cells[r.tag] = cell
        self.starts[r.tag] = now
        return cell


class DeviceServer:
    """One device of the configuration, served by ``handler_cls``."""

    def __init__(self, cfg, handler_cls: type[Handler], plugins=None):
        self.cfg = cfg
        self.name = cfg.name
        self.handler_cls = handler_cls
        self.plugins = plugins
        self.handler: Handler | None = None
        self.device: Device | None = None
        self.caps: dict = {}
        self.queues: dict[int, Queue] = {}
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.started_at: float | None = None
        self._lock = threading.Lock()
        self._serialize: threading.Lock | None = None
        self.is_async = False
        self.recovered = False
        self.request_errors = 0
        self.native_queues = 0  # queues whose batches the handler serves natively (attach_queue)
        self.timed_out = 0
        self.late_completions = 0
        self.exit_on_stall = False  # worker processes: a stalled queue kills the worker (see supervisor)
        self._trackers: dict[int, _Tracker] = {}
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0, recover_id: int | None = None) -> None:
        """Open the handler, create the device (or take over the QUIESCED device ``recover_id``
        left by a dead runner), start one thread per queue and start the device."""
        cfg = self.cfg
        t0 = time.monotonic()
        self._open_handler(recover_id)
        h, caps = self.handler, self.caps
        self.is_async = caps["native_target"] is None and any(
            inspect.iscoroutinefunction(getattr(h, m, None)) for m in IO_METHODS)
        if h.thread_model == "serialize" and cfg.queues > 1 and not self.is_async:
            self._serialize = threading.Lock()
        user_copy = None if cfg.user_copy == "auto" else bool(cfg.user_copy)
        discard = caps["can_discard"] or caps["can_write_zeroes"]
        try:
            if recover_id is not None:
                self.device = Device.recover(recover_id, timeout=timeout, size=caps["size"],
                                             queues=cfg.queues, depth=cfg.depth)
            else:
                self.device = Device.add(
                    caps["size"], dev_id=cfg.id, queues=cfg.queues, depth=cfg.depth,
                    max_io_bytes=cfg.max_io_size, user_copy=user_copy,
                    recovery=self.recovery_mode, timeout=timeout,
                    logical_block_size=caps["logical_block_size"],
                    physical_block_size=caps["physical_block_size"],
                    read_only=not caps["can_write"], volatile_cache=caps["can_flush"],
                    fua=caps["can_fua"] and caps["can_flush"],
                    chunk_bytes=int(getattr(h, "chunk_size", 0) or 0),
                    discard_granularity=int(getattr(h, "discard_granularity", 0) or
                                            max(4096, caps["logical_block_size"])) if discard else 0,
                    max_discard_bytes=int(getattr(h, "max_discard_bytes", 0) or (1 << 30)) if caps["can_discard"] else 0,
                    max_write_zeroes_bytes=(1 << 30) if caps["can_write_zeroes"] else 0,
                )
        except Exception as e:
            self._close_handler()
            if recover_id is not None:
                self._give_up(recover_id, f"taking it over failed: {e}")
            raise DeviceFailed(f"device {self.name!r}: {e}") from e
        try:
            ready = []
            # An asyncio handler with thread_model "serialize" is only ever entered from one
            # thread: one event loop serves all its queues (the kernel takes one task as the
            # server of several queues).  Otherwise each queue has its own thread.
            one_loop = self.is_async and h.thread_model == "serialize"
            groups = [list(range(cfg.queues))] if one_loop else [[q] for q in range(cfg.queues)]
            for q_ids in groups:
                ev = threading.Event()
                t = threading.Thread(target=self._queue_main, args=(q_ids, ev), daemon=True,
                                     name=f"ublk-{self.name}-q{'-'.join(map(str, q_ids))}")
                t.start()
                self.threads.append(t)
                ready.append(ev)
            for ev in ready:
                if not ev.wait(timeout):
                    raise TimeoutError("a queue thread did not come up")
            if self.errors:
                raise self.errors[0]
            if not caps["native_target"]:
                threading.Thread(target=self._watchdog, daemon=True, name=f"ublk-{self.name}-watchdog").start()
            self.device.start(timeout)
        except Exception as e:
            self._teardown(timeout)
            raise DeviceFailed(f"device {self.name!r}: starting failed: {e}") from e
        self.started_at = time.time()
        self.recovered = recover_id is not None
        log.info("device %s: %s %s in %.2f s (%d bytes, handler %s, %d queue(s), %s, recovery %s)",
                 self.name, "recovered" if self.recovered else "serving", self.device.block_path,
                 time.monotonic() - t0, caps["size"], cfg.handler, cfg.queues,
                 "native " + caps["native_target"][0] if caps["native_target"] else
                 "asyncio" if self.is_async else "threads", self.recovery_mode or "none")

    @property
    def recovery_mode(self) -> str | None:
        """The device's user-recovery mode: None, "requeue" or "reissue" ("auto" resolved)."""
        mode = self.cfg.recovery
        if mode == "auto":
            mode = "reissue" if getattr(self.handler_cls, "idempotent_writes", False) else "requeue"
        return None if mode == "none" else mode

    def _open_handler(self, recover_id: int | None) -> None:
        """Open the handler.  When recovering, a failing open is retried for ``recovery_grace``
        seconds (the backend may come back: a remounted share, a restarted server); after that the
        QUIESCED device is stopped and deleted, so its readers get errors instead of waiting forever."""
        cfg = self.cfg
        spec = dataclasses.replace(cfg.spec(), recovering=recover_id is not None)
        deadline = time.monotonic() + (cfg.recovery_grace if recover_id is not None else 0)
        while True:
            try:
                self.handler = self.handler_cls.open(dict(cfg.options), spec)
                self.caps = check_instance(self.handler, spec)
                return
            except Exception as e:
                self._close_handler()
                left = deadline - time.monotonic()
                if left <= 0:
                    if recover_id is not None:
                        self._give_up(recover_id, f"handler {cfg.handler!r} could not reopen its backend "
                                                  f"within recovery_grace={cfg.recovery_grace:g} s: {e}")
                    raise DeviceFailed(f"device {self.name!r}: handler {cfg.handler!r} failed to open: {e}") from e
                log.warning("device %s: recovering device %d: handler %r failed to open (%s); retrying for "
                            "%.0f s more", self.name, recover_id, cfg.handler, e, left)
                time.sleep(min(1.0, left))

    def _give_up(self, dev_id: int, why: str) -> None:
        from .ublk import remove_device
        log.error("device %s: cannot recover /dev/ublkb%d: %s; stopping and deleting it, so IO "
                  "waiting on it fails instead of hanging", self.name, dev_id, why)
        try:
            remove_device(dev_id)
        except Exception as e:  # noqa: BLE001 - reported, the runner goes on
            log.error("device %s: deleting device %d failed: %s", self.name, dev_id, e)

    def stop(self, timeout: float = 30.0) -> None:
        if self.device is None:
            return
        log.info("device %s: stopping %s", self.name, self.device.block_path)
        self._teardown(timeout)

    def _teardown(self, timeout: float) -> None:
        dev = self.device
        self._stopping.set()
        try:
            if dev is not None and dev._started:
                dev.stop(timeout)
        except Exception as e:  # noqa: BLE001 - keep tearing down
            log.error("device %s: STOP_DEV failed: %s", self.name, e)
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
            if t.is_alive():
                log.error("device %s: %s did not exit; deleting asynchronously", self.name, t.name)
        try:
            if dev is not None:
                dev.delete(max(0.5, deadline - time.monotonic()))
        except Exception as e:  # noqa: BLE001
            log.error("device %s: DEL_DEV failed: %s", self.name, e)
        self._close_handler()
        self.device = None

    def _close_handler(self) -> None:
        if self.handler is not None:
            try:
                self.handler.close()
            except Exception as e:  # noqa: BLE001 - the contract says: logged, ignored
                log.error("device %s: handler close failed: %r", self.name, e)
            self.handler = None

    # ------------------------------------------------------------------ queue threads
    def _queue_main(self, q_ids: list[int], ready: threading.Event) -> None:
        native = self.caps["native_target"]
        fwd = self._forwarder()
        opened = []
        try:
            for q_id in q_ids:
                q = self.device.open_queue(q_id, native=native[0] if native else None,
                                           native_options=native[1] if native else None,
                                           pollable=self.is_async,
                                           forward_fd=fwd.forward_fd if fwd else None,
                                           on_forwarded=fwd.forwarded if fwd else None)
                self.queues[q_id] = q
                opened.append(q)
        except BaseException as e:
            self.errors.append(e)
            for q in opened:
                q.close()
            ready.set()
            return
        try:
            if self.is_async:
                asyncio.run(self._serve_async(opened, ready))
            else:
                ready.set()
                self._serve_sync(opened[0])
        except QueueStopped:
            pass
        except BaseException as e:  # a bug in the runner: log it, the device dies with it
            log.exception("device %s queue(s) %s: serving loop failed", self.name, q_ids)
            self.errors.append(e)
        finally:
            for q in opened:
                q.close()

    def _forwarder(self):
        """The handler if it forwards READ/WRITE to a file through the core (sync path only)."""
        h = self.handler
        if h is None or self.caps.get("native_target") or self.is_async or getattr(h, "forward_fd", None) is None:
            return None
        return h

    def _forward(self, q: Queue, h, reqs: list[Request]) -> list[Request]:
        """Hand every READ/WRITE the handler maps to one file range to the core; return the rest."""
        rest = []
        can_fua = self.caps["can_fua"]
        for r in reqs:
            op = r.op_flags & 0xFF
            if op == OP_READ or op == OP_WRITE:
                fua = bool(r.op_flags & F_FUA)
                if not (fua and not can_fua):
                    try:
                        host = h.forward(op, r.offset, r.length, fua)
                    except Exception:  # noqa: BLE001 - the Python path reports the error
                        host = None
                    if host is not None:
                        q.forward(r, host)
                        continue
            rest.append(r)
        return rest

    def _serve_sync(self, q: Queue) -> None:
        bufs = None if not q.user_copy else _Buffers(q.depth)
        tracker = self._trackers[q.q_id] = _Tracker(q, bufs)
        one = self._one
        serialize = self._serialize
        batch = getattr(self.handler, "handle_batch", None)
        clock = time.monotonic
        attach = getattr(self.handler, "attach_queue", None)
        if attach is not None and serialize is None:
            sub = attach(q)
            if sub is not None:
                self.native_queues += 1
                return self._serve_native(q, sub, tracker)
        fwd = self.handler if q.forwarding else None
        while True:
            reqs = q.wait(1.0)
            now = tracker.heartbeat = clock()
            if not reqs:
                continue
            if serialize:
                serialize.acquire()
            try:
                if fwd is not None:
                    reqs = self._forward(q, fwd, reqs)
                if batch is not None:
                    if reqs:
                        self._batch(q, bufs, reqs, batch, tracker, now)
                else:
                    for r in reqs:
                        one(q, bufs, r, tracker.track(r, now))
            finally:
                if serialize:
                    serialize.release()

    def _serve_native(self, q: Queue, sub, tracker) -> None:
        """The handler's ``attach_queue(queue)`` returned a submitter: every batch goes to
        ``sub.submit(queue.raw_requests, n)`` in one call, and native code completes each
        request through the core (``queue.native_api()``); no request becomes a Python object.
        ``sub.detach()`` runs once the queue has stopped."""
        submit, raw, wait, clock = sub.submit, q.raw_requests, q.wait_raw, time.monotonic
        try:
            while True:
                n = wait(1.0)
                tracker.heartbeat = clock()  # request_timeout does not cover these requests
                if n:
                    submit(raw, n)
        finally:
            sub.detach()

    def _buffer(self, q: Queue, bufs: _Buffers | None, r: Request) -> memoryview:
        return bufs.get(r.tag, r.length) if bufs is not None else q.buffer(r)

    def _one(self, q: Queue, bufs, r: Request, cell: list) -> None:
        """Serve one request in place; the result is committed with the next wait()."""
        h = self.handler
        op = r.op_flags & 0xFF
        try:
            if op == OP_READ:
                buf = self._buffer(q, bufs, r)
                pending = h.read(r.offset, buf)
                if pending is None:
                    self._finish(q, cell, r, r.length, buf if bufs is not None else None)
                else:
                    self._later(q, cell, r, pending, buf if bufs is not None else None)
                return
            if op == OP_WRITE:
                buf = self._buffer(q, bufs, r)
                if bufs is not None:
                    q.read_data(r, buf)
                fua = r.fua
                pending = h.write(r.offset, buf.toreadonly(), fua and self.caps["can_fua"])
                if pending is None and fua and not self.caps["can_fua"]:
                    pending = h.flush()
                result = r.length
            elif op == OP_FLUSH:
                pending, result = h.flush(), 0
            elif op == OP_DISCARD:
                pending, result = h.discard(r.offset, r.length), 0
            elif op == OP_WRITE_ZEROES:
                pending, result = self._write_zeroes(q, bufs, r), 0
            else:
                self._finish(q, cell, r, -errno.EOPNOTSUPP)
                return
            if pending is None:
                self._finish(q, cell, r, result)
            else:
                self._later(q, cell, r, pending, None, result)
        except Exception as e:  # noqa: BLE001 - one failed request, not a failed device
            self._fail(q, r, e, cell)

    def _write_zeroes(self, q, bufs, r: Request):
        try:
            return self.handler.write_zeroes(r.offset, r.length, not r.no_unmap)
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP or not self.caps["can_write"]:
                raise
        zeros = bytes(min(r.length, 1 << 20))
        for off in range(0, r.length, len(zeros)):
            n = min(len(zeros), r.length - off)
            self.handler.write(r.offset + off, memoryview(zeros)[:n], False)
        return None

    def _later(self, q: Queue, cell: list, r: Request, pending, read_buf, result=None) -> None:
        """The handler returned a future: complete from whichever thread resolves it."""
        if not hasattr(pending, "add_done_callback"):
            raise TypeError(f"handler returned {type(pending).__name__}; expected None or a Future "
                            "(use 'async def' methods for awaitables)")

        def done(fut):
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001
                self._fail(q, r, e, cell)
                return
            self._finish(q, cell, r, r.length if result is None else result, read_buf)

        pending.add_done_callback(done)

    def _finish(self, q: Queue, cell: list | None, r: Request, result: int, data=None) -> bool:
        """Complete ``r`` unless the watchdog already failed it (then the late result is dropped:
        the tag may already carry another request)."""
        if cell is not None:
            try:
                cell.pop()
            except IndexError:
                self.late_completions += 1
                log.warning("device %s queue %d: %s at offset %d finished after its deadline had "
                            "failed it; result dropped", self.name, q.q_id, r.op_name, r.offset)
                return False
        q.complete(r, result, data=data)
        return True

    def _fail(self, q: Queue, r: Request, e: BaseException, cell: list | None = None) -> None:
        err = errno_of(e)
        if self._finish(q, cell, r, -err):
            self.request_errors += 1
            log.error("device %s queue %d: %s of %d bytes at offset %d failed with %s: %r", self.name,
                      q.q_id, r.op_name, r.length, r.offset, errno.errorcode.get(err, err), e)

    def _batch(self, q: Queue, bufs, reqs, batch, tracker: _Tracker, now: float) -> None:
        items = []
        for r in reqs:
            buf = None
            if r.op in (OP_READ, OP_WRITE):
                buf = self._buffer(q, bufs, r)
                if r.op == OP_WRITE and bufs is not None:
                    q.read_data(r, buf)
            items.append(BatchRequest(r, buf, tracker.track(r, now)))
        try:
            if batch(items) is not None:
                raise TypeError("handle_batch must finish every request before returning None")
        except Exception as e:  # noqa: BLE001 - the whole batch fails
            for it in items:
                if it.result is None:
                    it.result = e
        for it in items:
            r = it.request
            if isinstance(it.result, BaseException):
                self._fail(q, r, it.result, it.cell)
            elif isinstance(it.result, int) and it.result < 0:
                self._finish(q, it.cell, r, it.result)
            else:
                ok = r.length if r.op in (OP_READ, OP_WRITE) else 0
                self._finish(q, it.cell, r, ok, it.buf if (r.op == OP_READ and bufs is not None) else None)

    async def _serve_async(self, queues: list[Queue], ready: threading.Event) -> None:
        from . import aio
        ready.set()
        await asyncio.gather(*(aio.serve(q, self._async_handler(q)) for q in queues))

    def _async_handler(self, q: Queue):
        """The coroutine function that serves one request of ``q`` on its event loop."""
        bufs = None if not q.user_copy else _Buffers(q.depth)
        h = self.handler
        deadline = self.cfg.request_timeout

        async def handle(q, r):
            try:
                async with asyncio.timeout(deadline):
                    await serve(q, r)
            except TimeoutError:
                self.timed_out += 1
                log.error("device %s queue %d: handler %r did not finish %s of %d bytes at offset %d "
                          "within request_timeout=%g s; failed with ETIMEDOUT", self.name, q.q_id,
                          self.cfg.handler, r.op_name, r.length, r.offset, deadline)
                if bufs is not None:
                    bufs.retire(r.tag)
                q.complete(r, -errno.ETIMEDOUT)

        async def serve(q, r):
            op = r.op
            try:
                if op == OP_READ:
                    buf = self._buffer(q, bufs, r)
                    await h.read(r.offset, buf)
                    q.complete(r, r.length, data=buf if bufs is not None else None)
                    return
                if op == OP_WRITE:
                    buf = self._buffer(q, bufs, r)
                    if bufs is not None:
                        q.read_data(r, buf)
                    await h.write(r.offset, buf.toreadonly(), r.fua and self.caps["can_fua"])
                    if r.fua and not self.caps["can_fua"]:
                        await h.flush()
                    q.complete(r, r.length)
                    return
                if op == OP_FLUSH:
                    await h.flush()
                elif op == OP_DISCARD:
                    await h.discard(r.offset, r.length)
                elif op == OP_WRITE_ZEROES:
                    await write_zeroes(r)
                else:
                    raise OSError(errno.EOPNOTSUPP, "unsupported operation")
                q.complete(r, 0)
            except Exception as e:  # noqa: BLE001
                self._fail(q, r, e)

        async def write_zeroes(r):
            try:
                return await h.write_zeroes(r.offset, r.length, not r.no_unmap)
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP or not self.caps["can_write"]:
                    raise
            zeros = memoryview(bytes(min(r.length, 1 << 20)))
            for off in range(0, r.length, len(zeros)):
                await h.write(r.offset + off, zeros[:min(len(zeros), r.length - off)], False)

        return handle

    # ------------------------------------------------------------------ deadlines
    def _watchdog(self) -> None:
        """Fail requests that the handler has held longer than ``request_timeout``; report a
        queue thread stuck inside the handler (it cannot commit anything until it returns)."""
        limit = self.cfg.request_timeout
        period = min(1.0, max(0.05, limit / 4))
        while not self._stopping.wait(period):
            now = time.monotonic()
            for tr in list(self._trackers.values()):
                for tag, cell in enumerate(tr.cells):
                    if cell and now - tr.starts[tag] > limit:
                        self._expire(tr, tag, cell, limit)
                stuck = now - tr.heartbeat
                if stuck > limit + 2 and not tr.stalled:  # it returns to wait() at least every second
                    tr.stalled = True
                    log.error("device %s queue %d: the queue thread has been inside handler %r for %.0f s; "
                              "its requests cannot complete until it returns%s", self.name, tr.q.q_id,
                              self.cfg.handler, stuck,
                              "; killing this worker so the supervisor recovers the device"
                              if self.exit_on_stall else " (isolate: true lets the supervisor recover it)")
                    if self.exit_on_stall:
                        logging.shutdown()
                        os.kill(os.getpid(), signal.SIGKILL)
                elif stuck <= limit:
                    tr.stalled = False

    def _expire(self, tr: _Tracker, tag: int, cell: list, limit: float) -> None:
        if tr.bufs is None:
            # buffer mode: the handler writes into the kernel's buffer for this tag, which the
            # tag's next request would share, so the request cannot be failed safely; report it once
            tr.starts[tag] = float("inf")
            log.error("device %s queue %d: request at tag %d exceeded request_timeout=%g s (buffer mode: "
                      "not failed)", self.name, tr.q.q_id, tag, limit)
            return
        try:
            r = cell.pop()
        except IndexError:  # finished meanwhile
            return
        tr.bufs.retire(tag)
        self.timed_out += 1
        log.error("device %s queue %d: handler %r did not finish %s of %d bytes at offset %d within "
                  "request_timeout=%g s; failed with ETIMEDOUT", self.name, tr.q.q_id, self.cfg.handler,
                  r.op_name, r.length, r.offset, limit)
        try:
            tr.q.complete(r, -errno.ETIMEDOUT)
        except OSError as e:  # the queue is going away
            log.debug("device %s: failing a timed-out request: %s", self.name, e)

    # ------------------------------------------------------------------ reporting
    @property
    def config(self):
        """The device's DeviceConfig (what lifecycle hooks receive as ``device.config``)."""
        return self.cfg

    @property
    def dev_id(self) -> int | None:
        return self.device.dev_id if self.device else None

    def stats(self) -> dict:
        per_queue = {q_id: q.stats() for q_id, q in list(self.queues.items()) if not q.closed}
        total: dict = {"ops": {}, "bytes": {}, "errors": 0, "in_flight": 0, "forwarded": 0}
        for st in per_queue.values():
            for k in ("ops", "bytes"):
                for op, n in st[k].items():
                    total[k][op] = total[k].get(op, 0) + n
            total["errors"] += st["errors"]
            total["in_flight"] += st["in_flight"]
            total["forwarded"] += st["forwarded"]
        total["timed_out"] = self.timed_out
        total["late_completions"] = self.late_completions
        return {"device": self.name, "total": total, "queues": per_queue}

    def describe(self) -> dict:
        dev = self.device
        return {
            "name": self.name, "handler": self.cfg.handler,
            "id": dev.dev_id if dev else None, "block": dev.block_path if dev else None,
            "state": dev.refresh_info().state if dev else "STOPPED",
            "size": self.caps.get("size"), "queues": self.cfg.queues, "depth": self.cfg.depth,
            "mode": ("native-" + self.caps["native_target"][0]) if self.caps.get("native_target")
            else "asyncio" if self.is_async else "python-native" if self.native_queues
            else "python+forward" if any(q.forwarding for q in list(self.queues.values())) else "python",
        }


class BatchRequest:
    """One request as ``handle_batch`` sees it: ``op`` (runner.queue.OP_*), ``offset``,
    ``length``, ``fua``, ``buf`` (READ: fill it; WRITE: the data), and ``result``: leave None
    for success, or set a negative errno or an exception."""
    __slots__ = ("request", "buf", "result", "cell")

    def __init__(self, request: Request, buf, cell=None):
        self.request = request
        self.buf = buf
        self.result = None
        self.cell = cell

    op = property(lambda self: self.request.op)
    offset = property(lambda self: self.request.offset)
    length = property(lambda self: self.request.length)
    fua = property(lambda self: self.request.fua)
