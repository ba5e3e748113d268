"""An in-memory block device served from this program's own thread, using only the library.

    sudo python3 docs/examples/memdisk.py 64M      # then use /dev/ublkbN; Ctrl-C to remove it
"""
import sys
import threading

from runner.queue import OP_DISCARD, OP_READ, OP_WRITE, OP_WRITE_ZEROES, QueueStopped
from runner.ublk import Device

size = int(sys.argv[1].rstrip("M")) << 20 if len(sys.argv) > 1 else 64 << 20
disk = bytearray(size)
mem = memoryview(disk)


def serve(dev, ready):
    with dev.open_queue(0) as q:  # this thread is now the queue's server
        ready.set()
        try:
            while True:
                for r in q.wait():
                    span = mem[r.offset:r.offset + r.length]
                    if r.op == OP_READ:
                        q.complete(r, r.length, data=span)   # copied straight from our memory
                    elif r.op == OP_WRITE:
                        q.complete(r, q.read_data(r, span))  # copied straight into our memory
                    elif r.op in (OP_DISCARD, OP_WRITE_ZEROES):
                        span[:] = bytes(r.length)
                        q.complete(r, 0)
                    else:                                    # FLUSH: memory is always "stable"
                        q.complete(r, 0)
        except QueueStopped:
            pass


with Device.add(size, discard_granularity=4096, max_discard_bytes=1 << 30,
                max_write_zeroes_bytes=1 << 30) as dev:
    ready = threading.Event()
    server = threading.Thread(target=serve, args=(dev, ready), daemon=True)
    server.start()
    ready.wait()
    dev.start()
    print(f"serving {dev.block_path} ({size >> 20} MiB); Ctrl-C to stop", flush=True)
    try:
        server.join()
    except KeyboardInterrupt:
        pass
    dev.stop()
    server.join()
