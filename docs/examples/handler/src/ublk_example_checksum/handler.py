"""``checksum-mem``: a RAM disk that verifies a CRC-32 per chunk on every read."""
from __future__ import annotations

import errno
import logging
import zlib
from array import array

from runner.handler import SIZE, DeviceSpec, Handler, Opt

log = logging.getLogger(__name__)


class ChecksumMem(Handler):
    """Data lives in a ``bytearray``; ``crcs[i]`` is the CRC-32 of chunk ``i``.

    Writes update the data and then the checksums of the chunks they touch.
    Reads verify every chunk they touch first and fail with EIO on a mismatch.
    """

    # -- identity and contract (read by the registry at registry.add time) --
    name = "checksum-mem"
    API_VERSION = (1, 0)
    size_required = True            # a RAM disk cannot guess its size
    thread_model = "serialize"      # no locking below: the runner serializes calls
    options_schema = {
        "chunk": Opt(SIZE, default="4K", min=512, max=1 << 20,
                     help="bytes covered by one checksum; a multiple of block_size"),
        "fill": Opt(int, default=0, min=0, max=255, help="byte value the disk starts filled with"),
        "verify": Opt(bool, default=True, help="check checksums on reads (false: only maintain them)"),
    }

    # -- configuration time (main thread, nothing opened yet) --
    @classmethod
    def check_config(cls, options: dict, device: DeviceSpec) -> None:
        chunk = options["chunk"]
        if chunk % device.logical_block_size:
            raise ValueError(f"chunk {chunk} is not a multiple of block_size {device.logical_block_size}")
        if device.size % chunk:
            raise ValueError(f"the device size {device.size} is not a multiple of chunk {chunk}")

    # -- open (main thread; may block; raising fails only this device) --
    def __init__(self, options: dict, device: DeviceSpec):
        super().__init__(options, device)        # sets size and block sizes from the config
        self.chunk = options["chunk"]
        self.verify = options["verify"]
        self.data = bytearray([options["fill"]]) * device.size
        nchunks = device.size // self.chunk
        self._zero_crc = zlib.crc32(bytes(self.chunk))
        self.crcs = array("I", [zlib.crc32(self.data[: self.chunk])]) * nchunks
        self.bad_reads = 0

    # -- capabilities: can_write, can_discard and can_write_zeroes default to
    # True because the methods below are overridden; flush() is not, so
    # can_flush is False and the kernel sees a disk without a volatile cache.

    # -- IO (queue threads; one at a time because of thread_model) --
    def _chunks(self, offset: int, length: int) -> range:
        return range(offset // self.chunk, (offset + length - 1) // self.chunk + 1)

    def _rehash(self, offset: int, length: int) -> None:
        c, data = self.chunk, self.data
        for i in self._chunks(offset, length):
            self.crcs[i] = zlib.crc32(memoryview(data)[i * c:(i + 1) * c])

    def read(self, offset: int, buf: memoryview) -> None:
        if self.verify:
            c = self.chunk
            with memoryview(self.data) as mem:
                for i in self._chunks(offset, len(buf)):
                    if zlib.crc32(mem[i * c:(i + 1) * c]) != self.crcs[i]:
                        self.bad_reads += 1
                        raise OSError(errno.EIO, f"checksum mismatch in chunk {i} (bytes {i * c}..{(i + 1) * c - 1})")
        buf[:] = memoryview(self.data)[offset:offset + len(buf)]

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.data[offset:offset + len(data)] = data
        self._rehash(offset, len(data))

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, True)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self.data[offset:offset + length] = bytes(length)
        first, last = self._chunks(offset, length)[0], self._chunks(offset, length)[-1]
        self._rehash(first * self.chunk, self.chunk)          # partial chunks at the edges
        self._rehash(last * self.chunk, self.chunk)
        for i in range(first + 1, last):                      # whole chunks in between
            self.crcs[i] = self._zero_crc

    # -- close (main thread, after the last request) --
    def close(self) -> None:
        if self.bad_reads:
            log.warning("device %s: %d read(s) failed verification", self.device.name, self.bad_reads)
        self.data = bytearray()
