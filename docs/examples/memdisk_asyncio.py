"""An in-memory block device served by asyncio: one event loop, no threads.

    sudo python3 docs/examples/memdisk_asyncio.py 64M     # Ctrl-C to remove it
"""
import asyncio
import signal
import sys

from runner import aio
from runner.queue import OP_READ, OP_WRITE
from runner.ublk import Device

size = int(sys.argv[1].rstrip("M")) << 20 if len(sys.argv) > 1 else 64 << 20
mem = memoryview(bytearray(size))


async def handle(q, r):
    span = mem[r.offset:r.offset + r.length]
    if r.op == OP_READ:
        q.complete(r, r.length, data=span)
    elif r.op == OP_WRITE:
        q.complete(r, q.read_data(r, span))
    else:                       # FLUSH; no DISCARD/WRITE_ZEROES advertised
        q.complete(r, 0)


async def main():
    loop = asyncio.get_running_loop()
    with Device.add(size) as dev:
        q = dev.open_queue(0)
        server = loop.create_task(aio.serve(q, handle))
        await aio.start(dev)
        print(f"serving {dev.block_path} ({size >> 20} MiB); Ctrl-C to stop", flush=True)
        done = asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, done.set)
        loop.add_signal_handler(signal.SIGTERM, done.set)
        await done.wait()
        await aio.stop(dev)     # the loop keeps serving until every tag is aborted
        await server
        q.close()


asyncio.run(main())
