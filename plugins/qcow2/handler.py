"""The ``qcow2`` handler: a device served from a qcow2 image by this package's engine.

Requests never span two clusters (``chunk_size`` = the cluster size), so each one maps to at
most one L2 entry.  Flush and FUA make the image durable in the engine's crash-safe order.
"""
from __future__ import annotations

from runner.handler import SIZE, Handler, Opt

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

    def close(self):
        self.img.close()

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
