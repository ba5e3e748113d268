"""asyncio integration: serve queues and run control commands from one event loop, no threads.

A queue's :meth:`~runner.queue.Queue.fileno` is watched with ``loop.add_reader``; each request
becomes a task running the backend's coroutine, and completions made on the loop's thread are
committed in one batch per loop turn.  START_DEV (which blocks until the queues are fetched and
then reads the partition table through them) is submitted without waiting and reaped when the
control ring's eventfd fires, so the same loop keeps serving the queues meanwhile.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os

from .queue import Queue, QueueStopped, Request

log = logging.getLogger(__name__)


async def _control(device, name: str, data0: int = 0) -> int:
    loop = asyncio.get_running_loop()
    ctl = device._ctl
    ctl.submit(name, device.dev_id, data0=data0)
    done = loop.create_future()
    fd = ctl.fileno()

    def ready():
        try:
            res = ctl.reap(name, device.dev_id, timeout=0)
        except Exception as e:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.remove_reader(fd)
            done.set_exception(e)
            return
        if res is not None:
            loop.remove_reader(fd)
            done.set_result(res)

    loop.add_reader(fd, ready)
    try:
        return await asyncio.wait_for(done, device.timeout)
    except TimeoutError:
        loop.remove_reader(fd)
        ctl.reap(name, device.dev_id, timeout=0.001)  # expired: cancels the command and raises
        raise


async def start(device) -> None:
    """START_DEV from the event loop that serves the device's queues."""
    await _control(device, "START_DEV", data0=os.getpid())
    device._started = True


async def stop(device) -> None:
    await _control(device, "STOP_DEV")
    device._stopped = True


async def serve(queue: Queue, handle) -> None:
    """Serve ``queue`` on the running loop until the device stops.

    ``handle(queue, request)`` is a coroutine function that completes the request with
    ``queue.complete``.  If it raises, the request fails with the exception's errno (EIO if it
    has none) and the error is logged.
    """
    loop = asyncio.get_running_loop()
    fd = queue.fileno()
    stopped = loop.create_future()
    flush_scheduled = False
    tasks: set[asyncio.Task] = set()

    def dispatch():
        nonlocal flush_scheduled
        flush_scheduled = False
        try:
            reqs = queue.process()
        except QueueStopped:
            loop.remove_reader(fd)
            if not stopped.done():
                stopped.set_result(None)
            return
        for req in reqs:
            task = loop.create_task(run(req))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def schedule_flush():
        nonlocal flush_scheduled
        if not flush_scheduled:
            flush_scheduled = True
            loop.call_soon(dispatch)

    async def run(req: Request):
        try:
            await handle(queue, req)
        except Exception as e:  # noqa: BLE001 - a failing request must not kill the queue
            err = getattr(e, "errno", None) or errno.EIO
            log.error("device %s queue %s: %s of %d bytes at %d failed: %r",
                      queue.device.dev_id, queue.q_id, req.op_name, req.length, req.offset, e)
            queue.complete(req, -err)
        finally:
            schedule_flush()

    loop.add_reader(fd, dispatch)
    dispatch()
    await stopped
