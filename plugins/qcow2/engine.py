"""Pure-Python qcow2 (v2/v3) read/write engine.

Crash-safety rules (see shared notes, "A correct writer's obligations"):

* allocation: refcount raised and data written before anything points at the
  cluster; pointer (L2/L1) updates are kept *pending* (applied to the cached
  tables, so lookups see them) and reach the file only in ``_commit()``, after an
  fdatasync that made the refcounts and data durable ("soft updates");
* freeing: clusters whose pointer was dropped are decremented only in
  ``_commit()``, after the pointer change itself was written and synced;
so that a crash at any point can only leak clusters. ``flush()``, FUA writes,
``close()`` and a bound on the number of pending updates trigger a commit.

Forwarding (``map_forward``/``unpin_forward``): a caller may resolve a request to one
host range and do the IO itself (the ublk handler hands it to the native core). The
host cluster is pinned per cluster until ``unpin_forward``; a free that would drop a
pinned cluster's refcount to 0 is deferred to the last unpin instead of waiting, so
a thread that frees never waits for IO that only it could reap.

Threading: every metadata access happens under ``self._lock`` (an RLock).
Reads and in-place writes to clusters that are exclusively owned (COPIED) run
outside the lock; frees that drop a refcount to 0 wait until no such IO is in
flight, so an in-flight IO never lands in a cluster that was reused.
"""

import os
import struct
import threading
import zlib
from array import array
from collections import OrderedDict

MAGIC = b"QFI\xfb"

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F

OFFSET_MASK = 0x00FFFFFFFFFFFE00       # L1 and standard L2 entries
REFT_MASK = 0xFFFFFFFFFFFFFE00         # refcount table entries
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

MAX_L1_BYTES = 32 << 20           # qemu's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20      # qemu's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024
MAX_BACKING_DEPTH = 16
DEFAULT_CACHE_BYTES = 4 << 20

_HDR = struct.Struct(">4sIQIIQIIQQIIQ")      # 72 bytes (v2 header)
_HDR3 = struct.Struct(">QQQII")              # 32 more bytes for v3
_SNAP = struct.Struct(">QIHHIIQII")          # 40-byte snapshot entry header
_Q = struct.Struct(">Q")
_BIG_ENDIAN_HOST = array("Q", [1]).tobytes()[0] == 0


class Qcow2Error(ValueError):
    """An image is invalid, unsupported, or an operation is not allowed."""


def _be_array(data):
    a = array("Q")
    a.frombytes(bytes(data))
    if not _BIG_ENDIAN_HOST:
        a.byteswap()
    return a


def _pread_into(fd, mv, off):
    """Fill mv from fd at off; zero-fill past EOF. Returns bytes actually read."""
    got = 0
    n = len(mv)
    while got < n:
        r = os.preadv(fd, [mv[got:]], off + got)
        if r <= 0:
            mv[got:] = bytes(n - got)
            break
        got += r
    return got


def _pwrite_all(fd, data, off):
    mv = memoryview(data)
    done = 0
    n = len(mv)
    while done < n:
        w = os.pwrite(fd, mv[done:], off + done)
        if w <= 0:
            raise OSError("short write")
        done += w


class _LRU:
    def __init__(self, capacity):
        self.capacity = max(2, capacity)
        self.d = OrderedDict()

    def get(self, key):
        v = self.d.get(key)
        if v is not None:
            self.d.move_to_end(key)
        return v

    def put(self, key, value):
        self.d[key] = value
        self.d.move_to_end(key)
        while len(self.d) > self.capacity:
            self.d.popitem(last=False)

    def drop(self, key):
        self.d.pop(key, None)


class _RawBacking:
    """A raw file used as a backing file (read-only)."""

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)   # also right for block devices

    def readinto(self, offset, buf):
        _pread_into(self.fd, memoryview(buf), offset)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# QEMU-compatible image locking (file-posix): byte 100+i = "holds permission i",
# byte 200+i = "does not share permission i"; i: 0 consistent read, 1 write.
# Readers hold read and refuse to share write; writers also hold write.
_LOCK_PERM_BASE = 100
_LOCK_SHARED_BASE = 200
_FLOCK = struct.Struct("hhxxxxqqi4x")     # struct flock (Linux, 64-bit)


def _ofd_lock(fd, cmd, ltype, byte):
    import fcntl
    arg = _FLOCK.pack(ltype, os.SEEK_SET, byte, 1, 0)
    return _FLOCK.unpack(fcntl.fcntl(fd, cmd, arg))


def _take_image_locks(fd, writable):
    """Returns None, or a message naming the conflict. Silently does nothing where OFD
    locks are unavailable."""
    try:
        import fcntl
        getlk, setlk, rd, wr = fcntl.F_OFD_GETLK, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, \
            fcntl.F_WRLCK
    except (ImportError, AttributeError):
        return None
    if _FLOCK.size != 32:
        return None
    held = [_LOCK_PERM_BASE + 0, _LOCK_SHARED_BASE + 1]
    if writable:
        held.append(_LOCK_PERM_BASE + 1)
    try:
        for b in held:
            _ofd_lock(fd, setlk, rd, b)
        # nobody else may write while we hold the image; nobody may refuse our writes
        checks = [(_LOCK_PERM_BASE + 1, "another process has it open for writing")]
        if writable:
            checks.append((_LOCK_SHARED_BASE + 1, "another process holds it and does not "
                                                  "share write access"))
        for b, why in checks:
            if _ofd_lock(fd, getlk, wr, b)[0] != fcntl.F_UNLCK:
                return why
    except OSError as e:
        if e.errno in (11, 13):      # EAGAIN / EACCES: a conflicting lock
            return "another process holds a conflicting image lock"
        return None                  # locks unsupported here (e.g. some network fs)
    return None


def _zstd_decompressor():
    try:
        import zstandard  # type: ignore

        def dec(raw, size):
            return zstandard.ZstdDecompressor().decompressobj().decompress(raw)[:size]
        return dec
    except ImportError:
        pass
    try:
        from compression import zstd  # type: ignore  # Python >= 3.14

        def dec(raw, size):
            return zstd.ZstdDecompressor().decompress(raw, max_length=size)
        return dec
    except ImportError:
        return None


class Qcow2Image:
    """A qcow2 image opened for reading (and writing unless readonly)."""

    # ------------------------------------------------------------------ open

    @classmethod
    def open(cls, path, readonly=False, cache_bytes=DEFAULT_CACHE_BYTES, snapshot=None,
             lock=True, _chain=None):
        """Open an image. lock=False skips QEMU-compatible OFD image locks."""
        self = cls.__new__(cls)
        self._fd = None
        self._backing = None
        self._closed = False
        self.path = os.fspath(path)
        if snapshot is not None:
            readonly = True
        self.readonly = bool(readonly)
        chain = list(_chain or [])
        try:
            flags = (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC
            self._fd = os.open(self.path, flags)
        except OSError as e:
            raise Qcow2Error(f"{self.path}: cannot open: {e.strerror}") from e
        try:
            if lock:
                why = _take_image_locks(self._fd, not self.readonly)
                if why:
                    raise self._err(f"image is locked: {why} (QEMU-compatible lock)")
            self._parse(cache_bytes, snapshot, chain, lock)
        except BaseException:
            self.close()
            raise
        return self

    def _err(self, msg):
        return Qcow2Error(f"{self.path}: {msg}")

    def _parse(self, cache_bytes, snapshot, chain, lock=True):
        fd = self._fd
        self._file_end = os.lseek(fd, 0, os.SEEK_END)   # also right for block devices
        head = os.pread(fd, 4096, 0)
        if len(head) < _HDR.size:
            raise self._err(f"truncated: {len(head)} bytes is shorter than a qcow2 header")
        (magic, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
         nb_snap, snap_off) = _HDR.unpack_from(head, 0)
        if magic != MAGIC:
            raise self._err(f"bad magic {magic!r}: not a qcow2 image")
        if version not in (2, 3):
            raise self._err(f"unsupported qcow2 version {version}")
        if not 9 <= cbits <= 21:
            raise self._err(f"invalid cluster_bits {cbits} (must be 9..21)")
        cs = 1 << cbits
        self.version = version
        self.cluster_bits = cbits
        self.cluster_size = cs
        self._cmask = cs - 1
        if version == 3:
            if len(head) < _HDR.size + _HDR3.size:
                raise self._err("truncated: v3 header is incomplete")
            incompat, compat, autoclear, rorder, hlen = _HDR3.unpack_from(head, _HDR.size)
            if hlen < 104 or hlen > cs:
                raise self._err(f"invalid header_length {hlen}")
        else:
            incompat = compat = autoclear = 0
            rorder = 4
            hlen = 72
        hdr = os.pread(fd, cs, 0) if cs > len(head) else head[:cs]
        if len(hdr) < hlen:
            raise self._err("truncated: header is incomplete")
        self._header_length = hlen
        self.incompatible_features = incompat
        self.compatible_features = compat
        self.autoclear_features = autoclear
        comp_type = hdr[104] if (version == 3 and hlen > 104) else 0
        if crypt != 0:
            raise self._err(f"encrypted image (crypt_method={crypt}) is not supported")
        unknown = incompat & ~INCOMPAT_KNOWN
        if unknown:
            raise self._err(f"unknown incompatible feature bits 0x{unknown:x}; refusing to open")
        if incompat & INCOMPAT_DATA_FILE:
            raise self._err("external data file (incompatible bit 2) is not supported")
        if incompat & INCOMPAT_DIRTY and not self.readonly:
            raise self._err("dirty bit is set (lazy refcounts were not flushed, refcounts may be "
                            "stale); open with readonly=True or repair with 'qemu-img check -r all'")
        if incompat & INCOMPAT_CORRUPT and not self.readonly:
            raise self._err("corrupt bit is set; open with readonly=True or repair the image")
        self._ext_l2 = bool(incompat & INCOMPAT_EXTL2)
        if self._ext_l2 and not self.readonly:
            raise self._err("extended L2 entries (subclusters) are not supported for writing; "
                            "open with readonly=True")
        if self._ext_l2 and cbits < 14:
            raise self._err("extended L2 needs cluster_bits >= 14")
        if comp_type not in (0, 1):
            raise self._err(f"unknown compression_type {comp_type}")
        if comp_type != 0 and not incompat & INCOMPAT_COMPRESSION:
            raise self._err("compression_type set without the compression-type incompatible bit")
        self.compression_type = comp_type
        if rorder > 6:
            raise self._err(f"invalid refcount_order {rorder}")
        self.refcount_bits = 1 << rorder
        self._rc_max = (1 << self.refcount_bits) - 1
        self._rc_epb = cs * 8 // self.refcount_bits
        self._l2_esize = 16 if self._ext_l2 else 8
        self._l2_entries = cs // self._l2_esize

        # backing file name and header extensions
        self.backing_file = None
        self.backing_format = None
        ext_end = cs
        if bfo:
            if bfs == 0 or bfs > 1023 or bfo + bfs > cs or bfo < hlen:
                raise self._err(f"invalid backing file name location (offset {bfo}, size {bfs})")
            if bfo + bfs > len(hdr):
                raise self._err("truncated: backing file name past end of file")
            self.backing_file = hdr[bfo:bfo + bfs].decode("utf-8", "surrogateescape")
            ext_end = bfo
        pos = hlen
        while pos + 8 <= ext_end:
            etype, elen = struct.unpack_from(">II", hdr, pos)
            if etype == EXT_END:
                break
            if pos + 8 + elen > ext_end or pos + 8 + elen > len(hdr):
                raise self._err(f"header extension 0x{etype:x} overflows the header cluster")
            data = hdr[pos + 8:pos + 8 + elen]
            if etype == EXT_BACKING_FORMAT:
                self.backing_format = data.decode("utf-8", "replace")
            elif etype == EXT_CRYPTO:
                raise self._err("full-disk encryption header extension present; not supported")
            pos += 8 + ((elen + 7) & ~7)

        # L1 table
        l2_cover = cs * self._l2_entries
        if l1_size * 8 > MAX_L1_BYTES:
            raise self._err(f"l1_size {l1_size} is too large")
        need_l1 = -(-size // l2_cover)
        if need_l1 > l1_size:
            raise self._err(f"virtual size {size} needs {need_l1} L1 entries, l1_size is only "
                            f"{l1_size}")
        self._l1_size_hdr = l1_size
        self._l1_off = l1_off
        self._check_table("L1 table", l1_off, l1_size * 8)

        # refcount table
        if rt_clusters == 0 or rt_clusters * cs > MAX_REFTABLE_BYTES:
            raise self._err(f"invalid refcount_table_clusters {rt_clusters}")
        self._check_table("refcount table", rt_off, rt_clusters * cs)
        self._rt_off = rt_off
        self._rt_clusters = rt_clusters
        # metadata overlap checks
        regions = [("header", 0, cs), ("refcount table", rt_off, rt_clusters * cs)]
        if l1_size:
            regions.append(("L1 table", l1_off, l1_size * 8))
        for i, (na, a, alen) in enumerate(regions):
            for nb, b, blen in regions[i + 1:]:
                if a < b + blen and b < a + alen:
                    raise self._err(f"overlapping metadata: {na} and {nb}")
        self._meta_regions = regions

        # snapshots
        self.snapshots = []
        self._snap_l1 = {}
        if nb_snap:
            self._parse_snapshots(nb_snap, snap_off, size)

        # choose the L1 table (active or a snapshot's)
        self.size = size
        if snapshot is not None:
            key = str(snapshot)
            found = None
            for sid, name, ssize in self.snapshots:
                if sid == key or name == key:
                    found = (sid, ssize)
                    break
            if found is None:
                raise self._err(f"snapshot {snapshot!r} not found")
            s_l1_off, s_l1_size = self._snap_l1[found[0]]
            self.size = found[1]
            if s_l1_size * 8 > MAX_L1_BYTES:
                raise self._err(f"snapshot {snapshot!r}: l1_size too large")
            self._check_table(f"snapshot {snapshot!r} L1 table", s_l1_off, s_l1_size * 8)
            if -(-self.size // l2_cover) > s_l1_size:
                raise self._err(f"snapshot {snapshot!r}: L1 table too small for its size")
            l1_off, l1_size = s_l1_off, s_l1_size
            self._l1_off = None            # never written
        self._l1 = _be_array(os.pread(fd, l1_size * 8, l1_off)) if l1_size else array("Q")
        if len(self._l1) != l1_size:
            raise self._err("truncated: L1 table past end of file")
        rt = os.pread(fd, rt_clusters * cs, rt_off)
        if len(rt) != rt_clusters * cs:
            raise self._err("truncated: refcount table past end of file")
        self._rt = _be_array(rt)

        # caches
        cache_bytes = int(cache_bytes)
        self._l2_cache = _LRU((cache_bytes * 3 // 4) // cs)
        self._rb_cache = _LRU((cache_bytes // 4) // cs)
        self._lock = threading.RLock()
        self._io_cv = threading.Condition(threading.Lock())
        self._inflight = 0
        self._io_waiters = 0
        self._fwd_pins = {}              # host cluster index -> forwarded IOs in flight
        self._fwd_deferred = set()       # pinned clusters whose last reference was dropped
        self._free_hint = 0
        self._write_ready = False
        self._pend_l1 = {}
        self._pend_l2 = {}
        self._pend_free = []
        self._pend_count = 0
        self._pend_limit = 4096          # pending updates before a forced commit
        self._zstd = None
        self._dc_key = None
        self._dc_val = None

        # backing chain
        if self.backing_file is not None:
            self._open_backing(cache_bytes, chain, lock)

    def _check_table(self, what, off, length):
        if length == 0:
            return
        if off & self._cmask:
            raise self._err(f"{what} offset 0x{off:x} is not cluster aligned")
        if off + length > self._file_end:
            raise self._err(f"{what} at 0x{off:x} (+{length}) lies past end of file "
                            f"({self._file_end} bytes)")

    def _parse_snapshots(self, nb, off, active_size):
        if nb > MAX_SNAPSHOTS:
            raise self._err(f"too many snapshots ({nb})")
        if off & self._cmask:
            raise self._err("snapshot table offset is not cluster aligned")
        fd = self._fd
        pos = off
        for _ in range(nb):
            fixed = os.pread(fd, _SNAP.size, pos)
            if len(fixed) != _SNAP.size:
                raise self._err("truncated: snapshot table past end of file")
            (s_l1_off, s_l1_size, id_len, name_len, _ds, _dns, _vmc, _vms,
             extra_len) = _SNAP.unpack(fixed)
            if extra_len > MAX_SNAPSHOT_EXTRA:
                raise self._err(f"snapshot extra data too large ({extra_len})")
            rest_len = extra_len + id_len + name_len
            rest = os.pread(fd, rest_len, pos + _SNAP.size)
            if len(rest) != rest_len:
                raise self._err("truncated: snapshot table past end of file")
            ssize = active_size
            if extra_len >= 16:
                ssize = _Q.unpack_from(rest, 8)[0]
            sid = rest[extra_len:extra_len + id_len].decode("utf-8", "replace")
            name = rest[extra_len + id_len:].decode("utf-8", "replace")
            self.snapshots.append((sid, name, ssize))
            self._snap_l1[sid] = (s_l1_off, s_l1_size)
            pos += (_SNAP.size + rest_len + 7) & ~7
            if pos - off > 64 << 20:
                raise self._err("snapshot table too large")
        self._snap_table = (off, pos - off)

    def _open_backing(self, cache_bytes, chain, lock):
        name = self.backing_file
        if name.startswith("json:") or "://" in name:
            raise self._err(f"backing file {name!r} uses an unsupported protocol")
        bpath = name if os.path.isabs(name) else os.path.join(
            os.path.dirname(os.path.abspath(self.path)), name)
        real = os.path.realpath(bpath)
        chain = chain + [os.path.realpath(self.path)]
        if real in chain:
            raise self._err(f"backing chain loop via {bpath}")
        if len(chain) > MAX_BACKING_DEPTH:
            raise self._err(f"backing chain deeper than {MAX_BACKING_DEPTH}")
        if not os.path.exists(bpath):
            raise self._err(f"backing file {bpath} not found")
        fmt = self.backing_format
        if fmt is None:
            try:
                with open(bpath, "rb") as f:
                    fmt = "qcow2" if f.read(4) == MAGIC else "raw"
            except OSError as e:
                raise self._err(f"cannot probe backing file {bpath}: {e.strerror}") from e
        if fmt == "qcow2":
            self._backing = Qcow2Image.open(bpath, readonly=True, cache_bytes=cache_bytes,
                                            lock=lock, _chain=chain)
        elif fmt == "raw":
            try:
                self._backing = _RawBacking(bpath)
            except OSError as e:
                raise self._err(f"cannot open backing file {bpath}: {e.strerror}") from e
            why = _take_image_locks(self._backing.fd, False) if lock else None
            if why:
                raise self._err(f"backing file {bpath} is locked: {why}")
        else:
            raise self._err(f"unsupported backing format {fmt!r}")

    # -------------------------------------------------------------- plumbing

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Flush (if anything was written) and close; fds are closed even if that fails."""
        try:
            if self._fd is not None and getattr(self, "_fwd_pins", None) is not None:
                # closing means no forwarded IO is in flight any more: drop the pins (so the
                # frees the flush below commits happen now) and finish the deferred ones
                with self._lock:
                    self._fwd_pins.clear()
                    for idx in sorted(self._fwd_deferred):
                        self._decref(idx << self.cluster_bits)
                    self._fwd_deferred.clear()
            if self._fd is not None and not self.readonly and getattr(self, "_write_ready",
                                                                      False):
                self.flush()
        finally:
            self._closed = True
            if self._backing is not None:
                self._backing.close()
                self._backing = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def fileno(self):
        """The image file's descriptor (for doing IO at offsets from map_forward)."""
        self._check_open()
        return self._fd

    def _check_open(self):
        if self._fd is None:
            raise self._err("image is closed")

    def _check_range(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self._err(f"range {offset}+{length} is outside the virtual size {self.size}")

    def _check_writable(self):
        self._check_open()
        if self.readonly:
            raise self._err("image is opened read-only")

    def _io_enter(self):
        with self._io_cv:
            self._inflight += 1

    def _io_exit(self):
        with self._io_cv:
            self._inflight -= 1
            if self._io_waiters and not self._inflight:
                self._io_cv.notify_all()

    def _io_drain(self):
        with self._io_cv:
            while self._inflight:
                self._io_waiters += 1
                try:
                    self._io_cv.wait()
                finally:
                    self._io_waiters -= 1

    def _sync(self):
        os.fdatasync(self._fd)

    def _write(self, data, off):
        _pwrite_all(self._fd, data, off)
        end = off + len(data)
        if end > self._file_end:
            self._file_end = end

    # --------------------------------------------------------- metadata read

    def _check_meta_cluster(self, what, off):
        if off & self._cmask:
            raise self._err(f"{what} offset 0x{off:x} is not cluster aligned")
        if off + self.cluster_size > self._file_end:
            raise self._err(f"{what} at 0x{off:x} lies past end of file ({self._file_end} bytes)")
        cs = self.cluster_size
        for name, a, alen in self._meta_regions:
            if off < a + alen and a < off + cs:
                raise self._err(f"overlapping metadata: {what} at 0x{off:x} overlaps the {name}")

    def _load_l2(self, off):
        t = self._l2_cache.get(off)
        if t is None:
            self._check_meta_cluster("L2 table", off)
            t = bytearray(os.pread(self._fd, self.cluster_size, off))
            if len(t) != self.cluster_size:
                raise self._err(f"truncated: L2 table at 0x{off:x}")
            pend = self._pend_l2.get(off) if not self.readonly else None
            if pend:
                for i2, v in pend.items():
                    _Q.pack_into(t, i2 * 8, v)
            self._l2_cache.put(off, t)
        return t

    def _load_rb(self, off):
        t = self._rb_cache.get(off)
        if t is None:
            self._check_meta_cluster("refcount block", off)
            t = bytearray(os.pread(self._fd, self.cluster_size, off))
            if len(t) != self.cluster_size:
                raise self._err(f"truncated: refcount block at 0x{off:x}")
            self._rb_cache.put(off, t)
        return t

    def _entry(self, gcl):
        """(l2 entry, extended bitmap) for guest cluster gcl; (0, 0) if no L2 table."""
        i1, i2 = divmod(gcl, self._l2_entries)
        l2off = self._l1[i1] & OFFSET_MASK
        if not l2off:
            return 0, 0
        t = self._load_l2(l2off)
        if self._ext_l2:
            e, bm = struct.unpack_from(">QQ", t, i2 * 16)
            return e, bm
        return _Q.unpack_from(t, i2 * 8)[0], 0

    def _classify(self, e):
        """-> (kind, host offset or None)."""
        if e & COMPRESSED:
            return "compressed", None
        off = e & OFFSET_MASK
        if e & ZERO and self.version >= 3 and not self._ext_l2:
            return "zero", off
        if not off:
            return ("backing" if self._backing is not None else "unallocated"), None
        if off & self._cmask:
            raise self._err(f"data cluster offset 0x{off:x} in L2 entry is not cluster aligned")
        if off >= self._file_end:
            raise self._err(f"L2 entry points past end of file (0x{off:x} >= {self._file_end})")
        return "data", off

    def _compressed_span(self, e):
        x = 62 - (self.cluster_bits - 8)
        coff = e & ((1 << x) - 1)
        nsec = ((e >> x) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        return coff, nsec

    def _compressed_clusters(self, e):
        coff, nsec = self._compressed_span(e)
        start = coff & ~511
        end = start + nsec * 512
        return [c << self.cluster_bits for c in range(start >> self.cluster_bits,
                                                      ((end - 1) >> self.cluster_bits) + 1)]

    def _decompress(self, e):
        if self._dc_key == e:
            return self._dc_val
        coff, nsec = self._compressed_span(e)
        if coff >= self._file_end:
            raise self._err(f"compressed cluster at 0x{coff:x} lies past end of file")
        csize = nsec * 512 - (coff & 511)
        raw = os.pread(self._fd, csize, coff)
        cs = self.cluster_size
        try:
            if self.compression_type == 0:
                out = zlib.decompressobj(-15).decompress(raw, cs)
            else:
                if self._zstd is None:
                    self._zstd = _zstd_decompressor()
                    if self._zstd is None:
                        raise self._err("compressed cluster uses zstd but no zstd module "
                                        "(zstandard or compression.zstd) is importable")
                out = self._zstd(raw, cs)
        except zlib.error as ex:
            raise self._err(f"compressed cluster at 0x{coff:x} is corrupt: {ex}") from ex
        except Qcow2Error:
            raise
        except Exception as ex:  # zstd errors
            raise self._err(f"compressed cluster at 0x{coff:x} is corrupt: {ex}") from ex
        if len(out) != cs:
            raise self._err(f"compressed cluster at 0x{coff:x} decompresses to {len(out)} "
                            f"bytes, expected {cs}")
        self._dc_key, self._dc_val = e, out
        return out

    # ---------------------------------------------------------------- mapping

    def _map_locked(self, offset, length):
        """List of [guest, length, kind, host, entry] extents (merged)."""
        out = []
        cb = self.cluster_bits
        cs = self.cluster_size
        g = offset
        end = offset + length
        while g < end:
            gcl = g >> cb
            intra = g & self._cmask
            n = min(cs - intra, end - g)
            e, bm = self._entry(gcl)
            if self._ext_l2 and not e & COMPRESSED:
                self._map_ext(out, g, gcl, intra, n, e, bm)
                g += n
                continue
            kind, host = self._classify(e)
            if kind == "data":
                host += intra
            elif kind == "compressed":
                out.append([g, n, kind, None, e])
                g += n
                continue
            else:
                host = None
            self._append(out, g, n, kind, host, e)
            g += n
        return out

    @staticmethod
    def _append(out, g, n, kind, host, e):
        if out:
            last = out[-1]
            if last[2] == kind and kind != "compressed" and (
                    kind != "data" or last[3] + last[1] == host):
                last[1] += n
                return
        out.append([g, n, kind, host, e])

    def _map_ext(self, out, g, gcl, intra, n, e, bm):
        sc = self.cluster_size // 32
        off = e & OFFSET_MASK
        if off:
            if off & self._cmask:
                raise self._err(f"data cluster offset 0x{off:x} in L2 entry is not cluster aligned")
            if off >= self._file_end:
                raise self._err(f"L2 entry points past end of file (0x{off:x})")
        pos = intra
        stop = intra + n
        base = g - intra
        while pos < stop:
            i = pos // sc
            m = min((i + 1) * sc, stop) - pos
            if bm >> (32 + i) & 1:
                kind, host = "zero", None
            elif bm >> i & 1:
                if not off:
                    raise self._err("extended L2 entry has allocation bits without an offset")
                kind, host = "data", off + pos
            else:
                kind = "backing" if self._backing is not None else "unallocated"
                host = None
            self._append(out, base + pos, m, kind, host, e)
            pos += m

    def map_range(self, offset, length, pin=False):
        """Extents (guest_offset, length, kind, host_offset) covering the range.

        kind is 'data' (host_offset valid), 'zero', 'unallocated', 'compressed'
        or 'backing' (host_offset None). With pin=True the mapping is pinned:
        no cluster whose refcount drops to 0 is released (and so reused) until
        the caller calls unpin() -- once, whatever the result.
        """
        self._check_open()
        self._check_range(offset, length)
        with self._lock:
            ext = self._map_locked(offset, length)
            if pin:
                self._io_enter()
        return [(g, n, k, h if k == "data" else None) for g, n, k, h, _e in ext]

    def unpin(self):
        """End a pin taken by map_range/allocate_for_write(pin=True)."""
        self._io_exit()

    def map_forward(self, offset, length, write=False, fua=False):
        """Host offset for serving this request by plain IO on the image file, or None.

        Only when the range lies in one cluster and that cluster is data of this image
        (not backing, zero or compressed); for a write, also exclusively owned (COPIED
        in L1 and L2) so it is overwritten in place, and for FUA only when no metadata
        update is pending (RWF_DSYNC then makes the write durable with its mapping).
        A non-None result pins the host cluster: call unpin_forward() with the host
        offset once the IO is done. Raises like readinto/write for bad ranges.
        """
        self._check_open()
        self._check_range(offset, length)
        cb = self.cluster_bits
        if not length or offset >> cb != (offset + length - 1) >> cb:
            return None
        with self._lock:
            if write:
                if self.readonly:
                    raise self._err("image is opened read-only")
                if fua and (self._pend_l1 or self._pend_l2):
                    return None
                self._prepare_write()
                fe = self._fast_extent(offset, length)
                if fe is None or fe[1] != length:
                    return None
                host = fe[0]
            else:
                ext = self._map_locked(offset, length)
                if len(ext) != 1 or ext[0][2] != "data":
                    return None
                host = ext[0][3]
            idx = host >> cb
            pins = self._fwd_pins
            pins[idx] = pins.get(idx, 0) + 1
            return host

    def unpin_forward(self, hosts):
        """End the pins of forwarded IOs at these host offsets (from map_forward)."""
        cb = self.cluster_bits
        with self._lock:
            pins = self._fwd_pins
            for h in hosts:
                idx = h >> cb
                c = pins.get(idx, 0) - 1
                if c > 0:
                    pins[idx] = c
                    continue
                pins.pop(idx, None)
                if idx in self._fwd_deferred:
                    self._fwd_deferred.discard(idx)
                    self._decref(idx << cb)

    def forwards_pinned(self):
        """Number of host clusters pinned by forwarded IO (for tests and stats)."""
        with self._lock:
            return len(self._fwd_pins)

    # ------------------------------------------------------------------ reads

    def readinto(self, offset, buf):
        self._check_open()
        mv = memoryview(buf)
        if mv.readonly:
            raise self._err("readinto needs a writable buffer")
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        self._check_range(offset, n)
        if not n:
            return n
        with self._lock:
            ext = self._map_locked(offset, n)
            # compressed clusters are read under the lock
            comp = {}
            has_data = False
            for g, ln, kind, host, e in ext:
                if kind == "compressed":
                    comp[g] = self._decompress(e)
                elif kind == "data":
                    has_data = True
            if has_data:
                self._io_enter()
        try:
            fd = self._fd
            for g, ln, kind, host, e in ext:
                a = g - offset
                part = mv[a:a + ln]
                if kind == "data":
                    _pread_into(fd, part, host)
                elif kind == "backing":
                    self._read_backing(g, part)
                elif kind == "compressed":
                    intra = g & self._cmask
                    part[:] = comp[g][intra:intra + ln]
                else:
                    part[:] = bytes(ln)
        finally:
            if has_data:
                self._io_exit()
        return n

    def read(self, offset, length):
        b = bytearray(length)
        self.readinto(offset, b)
        return bytes(b)

    def _read_backing(self, g, part):
        b = self._backing
        n = len(part)
        avail = max(0, min(n, b.size - g))
        if avail:
            b.readinto(g, part[:avail])
        if avail < n:
            part[avail:] = bytes(n - avail)

    def _guest_cluster_content(self, gcl):
        """Full guest-visible content of a cluster (under lock)."""
        cs = self.cluster_size
        buf = bytearray(cs)
        g0 = gcl << self.cluster_bits
        n = min(cs, self.size - g0)
        if n > 0:
            mv = memoryview(buf)[:n]
            for g, ln, kind, host, e in self._map_locked(g0, n):
                a = g - g0
                part = mv[a:a + ln]
                if kind == "data":
                    _pread_into(self._fd, part, host)
                elif kind == "backing":
                    self._read_backing(g, part)
                elif kind == "compressed":
                    part[:] = self._decompress(e)[g & self._cmask:(g & self._cmask) + ln]
        return buf

    # -------------------------------------------------------------- refcounts

    def _refcount(self, idx):
        t = idx // self._rc_epb
        if t >= len(self._rt):
            return 0
        bo = self._rt[t] & REFT_MASK
        if not bo:
            return 0
        blk = self._load_rb(bo)
        i = idx % self._rc_epb
        bits = self.refcount_bits
        if bits >= 8:
            nb = bits >> 3
            return int.from_bytes(blk[i * nb:(i + 1) * nb], "big")
        bitpos = i * bits
        return (blk[bitpos >> 3] >> (bitpos & 7)) & self._rc_max

    def _set_refcount(self, idx, value):
        """Write one refcount (block must exist). Not synced."""
        if value < 0 or value > self._rc_max:
            raise self._err(f"refcount overflow/underflow for cluster {idx} ({value})")
        t = idx // self._rc_epb
        bo = self._rt[t] & REFT_MASK
        blk = self._load_rb(bo)
        i = idx % self._rc_epb
        bits = self.refcount_bits
        if bits >= 8:
            nb = bits >> 3
            blk[i * nb:(i + 1) * nb] = value.to_bytes(nb, "big")
            self._write(blk[i * nb:(i + 1) * nb], bo + i * nb)
        else:
            bitpos = i * bits
            byte = bitpos >> 3
            sh = bitpos & 7
            blk[byte] = (blk[byte] & ~(self._rc_max << sh) & 0xFF) | (value << sh)
            self._write(blk[byte:byte + 1], bo + byte)

    def _alloc(self, n=1):
        """Allocate n contiguous clusters with refcount 1, durable. Returns host offset."""
        if n >= self._rc_epb:
            raise self._err("allocation too large")
        i = max(self._free_hint, 1)
        while True:
            for j in range(i, i + n):
                if self._refcount(j):
                    i = j + 1
                    break
            else:
                break
        start = i
        self._free_hint = start + n
        excl = (start, start + n)
        for t in range(start // self._rc_epb, (start + n - 1) // self._rc_epb + 1):
            self._ensure_refblock(t, excl)
        for j in range(start, start + n):
            self._set_refcount(j, 1)
        # not synced here: _commit() syncs before any pointer to it is written
        return start << self.cluster_bits

    def _ensure_refblock(self, t, excl):
        if t < len(self._rt) and self._rt[t] & REFT_MASK:
            return
        if t >= len(self._rt):
            self._grow_reftable(t, excl)
            if self._rt[t] & REFT_MASK:
                return
        epb = self._rc_epb
        base = t * epb
        p = base
        while excl[0] <= p < excl[1]:
            p += 1
        if p >= base + epb:
            raise self._err("no room for a refcount block")
        blk = bytearray(self.cluster_size)
        self._rb_set_in(blk, p - base, 1)
        off = p << self.cluster_bits
        self._write(blk, off)
        self._sync()
        self._rb_cache.put(off, blk)
        self._rt[t] = off
        self._write(_Q.pack(off), self._rt_off + t * 8)

    def _rb_set_in(self, blk, i, value):
        bits = self.refcount_bits
        if bits >= 8:
            nb = bits >> 3
            blk[i * nb:(i + 1) * nb] = value.to_bytes(nb, "big")
        else:
            bitpos = i * bits
            blk[bitpos >> 3] |= value << (bitpos & 7)

    def _grow_reftable(self, t_needed, excl):
        cs = self.cluster_size
        epb = self._rc_epb
        old_entries = len(self._rt)
        file_cl = -(-self._file_end // cs)
        start = max(old_entries * epb, file_cl, excl[1])
        start = -(-start // epb) * epb
        B, T = 1, 1
        while True:
            end_cl = start + B + T
            entries = max(t_needed + 1, -(-end_cl // epb), old_entries)
            entries += entries // 4 + 1
            T2 = -(-entries * 8 // cs)
            B2 = -(-(B + T2) // epb)
            if (T2, B2) == (T, B):
                break
            T, B = T2, B2
        if T * cs > MAX_REFTABLE_BYTES:
            raise self._err("refcount table would exceed its maximum size (image too large)")
        entries = T * cs // 8
        new_rt = array("Q", self._rt)
        new_rt.extend([0] * (entries - old_entries))
        t0 = start // epb
        for k in range(B):
            blk = bytearray(cs)
            lo = start + k * epb
            for c in range(lo, min(lo + epb, start + B + T)):
                self._rb_set_in(blk, c - lo, 1)
            boff = (start + k) * cs
            self._write(blk, boff)
            self._rb_cache.put(boff, blk)
            new_rt[t0 + k] = boff
        rt_off = (start + B) * cs
        out = array("Q", new_rt)
        if not _BIG_ENDIAN_HOST:
            out.byteswap()
        self._write(out.tobytes(), rt_off)
        self._sync()
        # switch the header pointer (offset and cluster count are adjacent: one write)
        self._write(struct.pack(">QI", rt_off, T), 48)
        self._sync()
        old_off, old_n = self._rt_off, self._rt_clusters
        self._rt = new_rt
        self._rt_off, self._rt_clusters = rt_off, T
        self._meta_regions = [r for r in self._meta_regions if r[0] != "refcount table"]
        self._meta_regions.append(("refcount table", rt_off, T * cs))
        for k in range(old_n):
            self._decref(old_off + k * cs)

    def _decref(self, off):
        idx = off >> self.cluster_bits
        rc = self._refcount(idx)
        if rc == 0:
            raise self._err(f"refcount of cluster 0x{off:x} is already 0 while freeing "
                            "(image corrupt?)")
        if rc == 1:
            if idx in self._fwd_pins:
                # a forwarded IO still uses it: free it at the last unpin_forward()
                self._fwd_deferred.add(idx)
                return
            self._io_drain()
            self._l2_cache.drop(off)
            self._rb_cache.drop(off)
            if self._dc_key is not None:
                self._dc_key = None
            if idx < self._free_hint:
                self._free_hint = idx
        self._set_refcount(idx, rc - 1)

    # -------------------------------------------------------- metadata write

    def _prepare_write(self):
        """Called under the lock before the first modification."""
        if self._write_ready:
            return
        if self.autoclear_features:
            # we maintain none of the autoclear features (e.g. bitmaps): clear them all
            self._write(_Q.pack(0), 88)
            self._sync()
            self.autoclear_features = 0
        self._write_ready = True

    def _l1_set(self, i1, value):
        """Pending L1 update (visible now, written by _commit)."""
        self._l1[i1] = value
        self._pend_l1[i1] = value
        self._pend_count += 1

    def _l2_set(self, l2off, i2, value):
        """Pending L2 update (visible now, written by _commit)."""
        t = self._load_l2(l2off)
        _Q.pack_into(t, i2 * 8, value)
        self._pend_l2.setdefault(l2off, {})[i2] = value
        self._pend_count += 1

    def _free_later(self, offs):
        self._pend_free.extend(offs)
        self._pend_count += len(offs)

    def _commit(self):
        """Make pending pointer updates durable, then process pending frees. Under lock."""
        if not (self._pend_l1 or self._pend_l2 or self._pend_free):
            return False
        self._sync()                      # refcounts, data and new tables first
        for l2off, ents in self._pend_l2.items():
            t = self._load_l2(l2off)
            if len(ents) > 32:
                self._write(t, l2off)
            else:
                for i2 in sorted(ents):
                    self._write(t[i2 * 8:i2 * 8 + 8], l2off + i2 * 8)
        for i1, v in sorted(self._pend_l1.items()):
            self._write(_Q.pack(v), self._l1_off + i1 * 8)
        self._pend_l1 = {}
        self._pend_l2 = {}
        self._pend_count = 0
        if self._pend_free:
            self._sync()                  # pointers dropped durably before decrementing
            frees, self._pend_free = self._pend_free, []
            for f in frees:
                self._decref(f)
        return True

    def _maybe_commit(self):
        if self._pend_count >= self._pend_limit:
            self._commit()

    def _l2_for_write(self, i1):
        """Offset of an exclusively owned L2 table for L1 index i1 (allocating/COWing)."""
        l1e = self._l1[i1]
        l2off = l1e & OFFSET_MASK
        cs = self.cluster_size
        if not l2off:
            new = self._alloc(1)
            z = bytearray(cs)
            self._write(z, new)
            self._l2_cache.put(new, z)
            self._l1_set(i1, new | COPIED)
            return new
        if l1e & COPIED:
            return l2off
        old = self._load_l2(l2off)
        rc = self._refcount(l2off >> self.cluster_bits)
        if rc == 1:
            self._l1_set(i1, l2off | COPIED)
            return l2off
        # shared L2 table: copy it (entries lose COPIED: their clusters stay shared
        # with the other table), repoint L1, then drop our reference to the old table.
        tbl = _be_array(old)
        for k in range(len(tbl)):
            tbl[k] &= ~COPIED
        if not _BIG_ENDIAN_HOST:
            tbl.byteswap()
        newtbl = bytearray(tbl.tobytes())
        new = self._alloc(1)
        self._write(newtbl, new)
        self._l2_cache.put(new, newtbl)
        self._l1_set(i1, new | COPIED)
        self._free_later([l2off])
        return new

    def _free_list(self, kind, host, e):
        if kind == "compressed":
            return self._compressed_clusters(e)
        if kind in ("data", "zero") and host:
            return [host & ~self._cmask]
        return []

    def _make_exclusive(self, gcl, patch_intra=0, patch=None):
        """Make guest cluster gcl an exclusively owned data cluster, applying patch.

        Under the lock. Returns the host offset of the cluster. A new cluster gets
        its refcount and its full content written now; the L2 pointer and the frees
        of the old cluster(s) are pending until _commit() (which syncs in between).
        """
        cs = self.cluster_size
        i1, i2 = divmod(gcl, self._l2_entries)
        l2off = self._l2_for_write(i1)
        e = _Q.unpack_from(self._load_l2(l2off), i2 * 8)[0]
        kind, host = self._classify(e)
        plen = len(patch) if patch is not None else 0
        if kind == "data":
            if not e & COPIED and self._refcount(host >> self.cluster_bits) == 1:
                e |= COPIED
                self._l2_set(l2off, i2, e)
            if e & COPIED:
                if plen:
                    self._write(patch, host + patch_intra)
                return host
        if kind == "zero" and host and (e & COPIED) and \
                self._refcount(host >> self.cluster_bits) == 1:
            buf = bytearray(cs)
            if plen:
                buf[patch_intra:patch_intra + plen] = patch
            self._write(buf, host)
            self._l2_set(l2off, i2, host | COPIED)
            return host
        # allocate a new cluster with the full guest content
        frees = self._free_list(kind, host, e)
        new = self._alloc(1)
        if 0 < plen < cs and kind in ("unallocated", "zero") and new >= self._file_end:
            # a fresh cluster past EOF reads as zeros: extend the file (sparse) and write
            # only the patch instead of a mostly-zero cluster
            os.ftruncate(self._fd, new + cs)
            self._file_end = new + cs
            self._write(patch, new + patch_intra)
        else:
            if plen == cs:
                buf = patch
            else:
                buf = self._guest_cluster_content(gcl)
                if plen:
                    buf[patch_intra:patch_intra + plen] = patch
            self._write(buf, new)
        self._l2_set(l2off, i2, new | COPIED)
        if frees:
            self._free_later(frees)
        return new

    # ----------------------------------------------------------------- writes

    def _fast_extent(self, g, length):
        """(host, n) for an in-place writable run starting at g, or None. Under lock."""
        cb = self.cluster_bits
        cs = self.cluster_size
        end = g + length
        host0 = None
        total = 0
        while g < end:
            gcl = g >> cb
            i1 = gcl // self._l2_entries
            l1e = self._l1[i1]
            if not l1e & COPIED:
                break
            e, _ = self._entry(gcl)
            if (e & (COPIED | COMPRESSED | ZERO)) != COPIED:
                break
            kind, host = self._classify(e)
            intra = g & self._cmask
            host += intra
            if host0 is None:
                host0 = host
            elif host0 + total != host:
                break
            n = min(cs - intra, end - g)
            total += n
            g += n
        if host0 is None:
            return None
        return host0, total

    def write(self, offset, data, fua=False):
        self._check_writable()
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        self._check_range(offset, n)
        pos = 0
        cs = self.cluster_size
        while pos < n:
            g = offset + pos
            with self._lock:
                self._prepare_write()
                fe = self._fast_extent(g, n - pos)
                if fe is None:
                    intra = g & self._cmask
                    chunk = min(cs - intra, n - pos)
                    self._make_exclusive(g >> self.cluster_bits, intra, mv[pos:pos + chunk])
                    self._maybe_commit()
                    pos += chunk
                    continue
                self._io_enter()
            try:
                host, ln = fe
                _pwrite_all(self._fd, mv[pos:pos + ln], host)
            finally:
                self._io_exit()
            pos += ln
        if fua:
            self.flush()
        return n

    def allocate_for_write(self, offset, length, pin=False):
        """Host offset of a contiguous, exclusively owned data range, or None.

        Clusters that are not yet exclusive data are allocated/COWed here with their
        current guest content (so the caller may write any part of the range in
        place); that metadata is made durable before returning. None means the
        clusters are not host-contiguous: use write(). pin=True: as for map_range.
        """
        self._check_writable()
        self._check_range(offset, length)
        if length == 0:
            if pin:
                self._io_enter()
            return None
        with self._lock:
            r = self._allocate_for_write_locked(offset, length)
            if pin:
                self._io_enter()
            return r

    def _allocate_for_write_locked(self, offset, length):
        cb = self.cluster_bits
        self._prepare_write()
        fe = self._fast_extent(offset, length)
        if fe is not None and fe[1] == length:
            return fe[0]
        changed = False
        hosts = []
        for gcl in range(offset >> cb, ((offset + length - 1) >> cb) + 1):
            e, _ = self._entry(gcl)
            l1e = self._l1[gcl // self._l2_entries]
            if (e & (COPIED | COMPRESSED | ZERO)) == COPIED and l1e & COPIED:
                hosts.append(e & OFFSET_MASK)
            else:
                hosts.append(self._make_exclusive(gcl))
                changed = True
        if changed:
            self._commit()
            self._sync()
        for k in range(1, len(hosts)):
            if hosts[k] != hosts[0] + (k << cb):
                return None
        return hosts[0] + (offset & self._cmask)

    def _zero_range(self, offset, length, unmap):
        self._check_writable()
        self._check_range(offset, length)
        cs = self.cluster_size
        end = offset + length
        first_full = -(-offset // cs) * cs
        last_full = end // cs * cs
        if first_full >= last_full:
            self._write_zero_partial(offset, length)
            return
        if offset < first_full:
            self._write_zero_partial(offset, first_full - offset)
        if last_full < end:
            self._write_zero_partial(last_full, end - last_full)
        with self._lock:
            self._prepare_write()
            frees = []
            gcl = first_full >> self.cluster_bits
            gend = last_full >> self.cluster_bits
            while gcl < gend:
                if self._backing is None and not self._l1[gcl // self._l2_entries]:
                    # no L2 table and no backing file: the whole table's range reads zeros
                    gcl = (gcl // self._l2_entries + 1) * self._l2_entries
                    continue
                self._zero_cluster(gcl, unmap, frees)
                gcl += 1
                if frees:
                    self._free_later(frees)
                    frees = []
                self._maybe_commit()

    def _write_zero_partial(self, offset, length):
        with self._lock:
            kinds = {x[2] for x in self._map_locked(offset, length)}
        if kinds <= {"zero", "unallocated"}:
            return
        self.write(offset, bytes(length))

    def _zero_cluster(self, gcl, unmap, frees):
        i1, i2 = divmod(gcl, self._l2_entries)
        e, _ = self._entry(gcl)
        kind, host = self._classify(e)
        backing = self._backing is not None
        if self.version >= 3:
            if kind == "unallocated" or (kind == "zero" and not (unmap and host)):
                return
            l2off = self._l2_for_write(i1)
            e = _Q.unpack_from(self._load_l2(l2off), i2 * 8)[0]
            kind, host = self._classify(e)
            if not unmap and kind == "data" and (
                    e & COPIED or self._refcount(host >> self.cluster_bits) == 1):
                self._l2_set(l2off, i2, host | COPIED | ZERO)
                return
            self._l2_set(l2off, i2, ZERO if backing else 0)
            frees.extend(self._free_list(kind, host, e))
            return
        # v2: no zero flag
        if backing:
            self._make_exclusive(gcl, 0, bytes(self.cluster_size))
            return
        if kind == "unallocated":
            return
        l2off = self._l2_for_write(i1)
        e = _Q.unpack_from(self._load_l2(l2off), i2 * 8)[0]
        kind, host = self._classify(e)
        self._l2_set(l2off, i2, 0)
        frees.extend(self._free_list(kind, host, e))

    def discard(self, offset, length):
        """Discard: afterwards the range reads as zeros; whole clusters are freed."""
        self._zero_range(offset, length, unmap=True)

    def write_zeroes(self, offset, length, unmap=False):
        """Write zeroes: v3 sets the zero flag (keeping allocations unless unmap)."""
        self._zero_range(offset, length, unmap=unmap)

    def flush(self):
        self._check_open()
        if not self.readonly:
            with self._lock:
                self._commit()
                self._sync()


# ------------------------------------------------------------------ create

def create(path, size, cluster_size=65536, version=3, backing=None, backing_format=None,
           _backing_format_ext=True):
    """Create an empty qcow2 image (16-bit refcounts). For tests and tooling."""
    path = os.fspath(path)
    if version not in (2, 3):
        raise Qcow2Error(f"{path}: version must be 2 or 3")
    cbits = cluster_size.bit_length() - 1
    if cluster_size != 1 << cbits or not 9 <= cbits <= 21:
        raise Qcow2Error(f"{path}: cluster_size must be a power of two in 512..2M")
    cs = cluster_size
    if size < 0:
        raise Qcow2Error(f"{path}: negative size")
    l1_size = -(-size // (cs * (cs // 8)))
    if l1_size * 8 > MAX_L1_BYTES:
        raise Qcow2Error(f"{path}: size too large for cluster size")
    L = max(1, -(-l1_size * 8 // cs))
    epb = cs * 8 // 16
    T, B = 1, 1
    while True:
        total = 1 + T + B + L
        B2 = -(-total // epb)
        T2 = -(-B2 * 8 // cs)
        if (B2, T2) == (B, T):
            break
        B, T = B2, T2
    total = 1 + T + B + L
    rt_off = cs
    rb_off = (1 + T) * cs
    l1_off = (1 + T + B) * cs

    hdr = bytearray(cs)
    exts = b""
    bname = b""
    if backing is not None:
        bname = os.fsencode(backing)
        if len(bname) > 1023:
            raise Qcow2Error(f"{path}: backing file name too long")
        if backing_format is None:
            bpath = backing if os.path.isabs(backing) else os.path.join(
                os.path.dirname(os.path.abspath(path)), backing)
            with open(bpath, "rb") as f:
                backing_format = "qcow2" if f.read(4) == MAGIC else "raw"
        if _backing_format_ext:
            fb = backing_format.encode()
            exts += struct.pack(">II", EXT_BACKING_FORMAT, len(fb)) + fb + \
                bytes((8 - len(fb) % 8) % 8)
    exts += struct.pack(">II", EXT_END, 0)
    hlen = 104 if version == 3 else 72
    bfo = hlen + len(exts) if bname else 0
    if bfo + len(bname) > cs:
        raise Qcow2Error(f"{path}: header does not fit in one cluster")
    _HDR.pack_into(hdr, 0, MAGIC, version, bfo, len(bname), cbits, size, 0, l1_size, l1_off,
                   rt_off, T, 0, 0)
    if version == 3:
        _HDR3.pack_into(hdr, 72, 0, 0, 0, 4, 104)
    hdr[hlen:hlen + len(exts)] = exts
    if bname:
        hdr[bfo:bfo + len(bname)] = bname
    rt = array("Q", [rb_off + k * cs for k in range(B)] + [0] * (T * cs // 8 - B))
    if not _BIG_ENDIAN_HOST:
        rt.byteswap()
    rbs = bytearray(B * cs)
    for c in range(total):
        struct.pack_into(">H", rbs, c * 2, 1)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _pwrite_all(fd, hdr, 0)
        _pwrite_all(fd, rt.tobytes(), rt_off)
        _pwrite_all(fd, rbs, rb_off)
        os.ftruncate(fd, total * cs)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path
