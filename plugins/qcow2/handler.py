"""The ``qcow2`` handler: a device served from a qcow2 image by this package's engine.

Requests never span two clusters (``chunk_size`` = the cluster size), so each one maps to at
most one L2 entry.  Flush and FUA make the image durable in the engine's crash-safe order.

Fast path (``forward: true``, the default): a READ of a data cluster of this image, or a WRITE
to a data cluster it owns exclusively (COPIED), is resolved here to the host offset and handed
to the native core, which moves the data between the request and the image file without
copying it through Python.  Everything else (backing, zero, compressed and unallocated clusters,
COW, discard, write-zeroes, flush) takes the Python path through the engine.  The host cluster
stays pinned until the core reports the IO done, so a racing discard or COW defers freeing it.
"""
from __future__ import annotations

from runner.handler import SIZE, Handler, Opt
from runner.queue import OP_WRITE

from .engine import Qcow2Image, create


class Qcow2Handler(Handler):
    name = "qcow2"
    API_VERSION = (1, 0)
    thread_model = "parallel"     # metadata under the engine's lock, data IO outside it
    idempotent_writes = True
    options_schema = {
        "path": Opt(str, required=True, help="the qcow2 image"),
        "cache": Opt(SIZE, default="32M", help="L2 and refcount-block cache size"),
        "snapshot": Opt(str, help="serve this internal snapshot (id or name), read-only"),
        "create": Opt(bool, default=False,
                      help="create the image (qcow2 v3, 64K clusters) at the device size if missing"),
        "cluster_size": Opt(SIZE, default="64K", help="cluster size for a created image"),
        "forward": Opt(bool, default=True,
                       help="serve READ/WRITE of allocated clusters in the native core (no copy through Python)"),
    }
    can_flush = can_fua = True

    @classmethod
    def open(cls, options, device):
        import os
        path = options["path"]
        if options["create"] and not device.recovering and not os.path.exists(path):
            if not device.size:
                raise ValueError(f"cannot create {path}: the device has no size")
            create(path, device.size, cluster_size=options["cluster_size"])
        read_only = device.read_only or options["snapshot"] is not None
        img = Qcow2Image.open(path, readonly=read_only, cache_bytes=options["cache"],
                              snapshot=options["snapshot"])
        return cls(options, device, img)

    def __init__(self, options, device, img):
        super().__init__(options, device)
        self.img = img
        self.size = img.size - img.size % device.logical_block_size
        self.chunk_size = img.cluster_size
        self.discard_granularity = img.cluster_size
        writable = not img.readonly
        self.can_write = self.can_discard = self.can_write_zeroes = writable
        self.forward_fd = img.fileno() if options.get("forward", True) else None

    def close(self):
        self.img.close()

    def forward(self, op, offset, length, fua):
        """Host offset to forward this READ/WRITE to (pinned), or None for the Python path."""
        return self.img.map_forward(offset, length, write=op == OP_WRITE, fua=fua)

    def forwarded(self, done):
        """Forwarded requests finished: release their host clusters."""
        self.img.unpin_forward([d.host_offset for d in done])

    def read(self, offset, buf):
        self.img.readinto(offset, buf)

    def write(self, offset, data, fua):
        self.img.write(offset, data, fua=fua)

    def flush(self):
        self.img.flush()

    def discard(self, offset, length):
        self.img.discard(offset, length)

    def write_zeroes(self, offset, length, may_unmap):
        self.img.write_zeroes(offset, length, unmap=may_unmap)
