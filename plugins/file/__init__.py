"""The ``file`` handler: a regular file or a block device.

``mode: native`` (default) serves every request with io_uring on the backing fd inside the
native core; ``mode: python`` serves the same file through this module's methods, for
comparison and as the reference Python handler.  Flush is fdatasync, discard punches a hole,
write-zeroes zeroes the range (or punches it when unmapping is allowed), FUA writes use
RWF_DSYNC.  A missing regular file is created sparse at the configured size.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from runner.core import lib
from runner.handler import Handler, Opt
from runner.hookspecs import hookimpl

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    ret = lib.ub_fallocate(fd, mode, offset, length)
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))


def _can_punch(fd: int, size: int) -> bool:
    """Punching a hole past EOF changes nothing but tells whether the filesystem can."""
    try:
        _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, max(size, os.fstat(fd).st_size), 4096)
    except OSError:
        return False
    return True


class FileHandler(Handler):
    name = "file"
    API_VERSION = (1, 0)
    thread_model = "parallel"   # pread/pwrite on one fd are thread-safe
    idempotent_writes = True
    options_schema = {
        "path": Opt(str, required=True, help="backing file or block device"),
        "direct": Opt(bool, default=False, help="open with O_DIRECT (bypass the host page cache)"),
        "mode": Opt(str, default="native", choices=["native", "python"],
                    help="native: io_uring in the core; python: this handler's methods"),
        "create": Opt(bool, default=True, help="create a missing regular file, sparse, at the device size"),
    }
    can_flush = can_discard = can_write_zeroes = can_fua = True

    @classmethod
    def open(cls, options, device):
        path = options["path"]
        exists = os.path.exists(path)
        if not exists:
            if device.recovering:
                raise FileNotFoundError(errno.ENOENT, f"backing file {path} is gone; a new empty file would "
                                                      "silently replace the data the device served")
            if not options["create"]:
                raise FileNotFoundError(errno.ENOENT, f"backing file {path} does not exist (create: false)")
            if device.size is None:
                raise ValueError(f"backing file {path} does not exist and the device has no size to create it with")
        flags = os.O_CLOEXEC | (os.O_RDONLY if device.read_only else os.O_RDWR)
        if not exists:
            flags |= os.O_CREAT | os.O_EXCL
        if options["direct"]:
            flags |= os.O_DIRECT
        fd = os.open(path, flags, 0o600)
        try:
            st = os.fstat(fd)
            is_block = stat.S_ISBLK(st.st_mode)
            if is_block:
                have = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
            elif stat.S_ISREG(st.st_mode):
                if not exists or (device.size and st.st_size < device.size):
                    os.ftruncate(fd, device.size)   # sparse
                have = os.fstat(fd).st_size
            else:
                raise ValueError(f"{path} is neither a regular file nor a block device")
            size = device.size or have
            if size > have:
                raise ValueError(f"{path} has {have} bytes, the device wants {size}")
            size -= size % device.logical_block_size
            return cls(options, device, fd, size, is_block)
        except BaseException:
            os.close(fd)
            raise

    def __init__(self, options, device, fd, size, is_block):
        super().__init__(options, device)
        self.fd = fd
        self.size = size
        self.is_block = is_block
        self.can_write = not device.read_only
        # Filesystems without hole punching (9p, some FUSE) cannot discard or zero ranges cheaply;
        # not advertising them makes the kernel write zeros itself instead of failing requests.
        if not is_block and not (self.can_write and _can_punch(fd, size)):
            self.can_discard = self.can_write_zeroes = False
        if options["mode"] == "native":
            self.native_target = ("file", {"fd": fd})

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, offset, buf):
        n = os.preadv(self.fd, [buf], offset)
        if n < len(buf):  # past the end of a shorter file
            buf[n:] = bytes(len(buf) - n)

    def write(self, offset, data, fua):
        n = os.pwritev(self.fd, [data], offset, os.RWF_DSYNC if fua else 0)
        if n != len(data):
            raise OSError(errno.EIO, f"short write: {n} of {len(data)} bytes at {offset}")

    def flush(self):
        os.fdatasync(self.fd)

    def discard(self, offset, length):
        _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset, length, may_unmap):
        if may_unmap:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        try:
            _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            # tmpfs and others lack ZERO_RANGE: punch the hole, then allocate it again
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            _fallocate(self.fd, FALLOC_FL_KEEP_SIZE, offset, length)


@hookimpl
def ublk_runner_register_handlers(registry):
    registry.add(FileHandler)
