"""Asynchronous librbd backend for the rbd handler, on Debian's python3-rbd/python3-rados.

Facts about the binding (python3-rbd 16.2.15, librbd 1.16.0) this module is built on,
checked against a real cluster (see tests/ceph/):

* ``Image.aio_read`` always allocates a new ``bytes`` object of the requested length and
  has librbd read straight into it (one allocation, no extra copy), then hands it to the
  completion callback. It cannot read into a caller-supplied buffer, so "zero copy" into
  a ublk IO buffer is not possible through this binding: :meth:`RbdBackend.aio_readinto`
  does the one ``memcpy`` from that bytes object into the caller's buffer.
  A read that crosses the end of the image is silently short; we refuse it up front.
* ``Image.aio_write`` takes ``bytes`` or ``bytearray`` (not ``memoryview``); librbd copies
  the data at submission (``rbd_disable_zero_copy_writes`` defaults to true), so the caller
  may reuse its buffer once ``aio_write`` returns. Other buffer types are copied to bytes.
* ``Image.aio_write_zeroes(offset, length, oncomplete, zero_flags=0)`` exists. librbd
  zeroes exactly the range (writes zeroes in partial objects, deallocates whole objects
  unless RBD_WRITE_ZEROES_FLAG_THICK_PROVISION is passed), so it is the right operation
  for REQ_OP_WRITE_ZEROES. ``aio_discard`` is *not*: with the default
  ``rbd_discard_granularity_bytes`` (64 KiB) and ``rbd_skip_partial_discard`` (true) a
  small or unaligned discard is accepted and changes nothing.
* Neither ``rbd`` nor ``rados`` exports ``LIBRADOS_OP_FLAG_FADVISE_FUA`` (0x80 in
  librados.h), but ``aio_write`` passes any ``fadvise_flags`` int through to
  ``rbd_aio_write2``; librbd's write-around cache honours FUA by sending that write
  straight to the OSDs. We pass 0x80.
* Completion callbacks run on librbd's single completion thread (``Dummy-N`` in Python's
  eyes) holding the GIL. Exceptions raised there are swallowed by the binding; we catch
  and log them ourselves.
* ``rados_osd_op_timeout`` is read per operation, so it can be changed after the image is
  open: we bound the open by ``timeout`` and then switch IO to ``io_timeout`` (default 0:
  wait for the OSDs to come back, which is what the kernel's rbd driver does too).
"""

from __future__ import annotations

import errno as _errno
import logging
import math
import os
import threading
import time
from typing import Callable, Optional

log = logging.getLogger(__name__)

LIBRADOS_OP_FLAG_FADVISE_FUA = 0x80  # librados.h; not exported by the Python binding

Callback = Callable[[int, Optional[bytes]], None]


class RbdError(Exception):
    """Opening or using an RBD image failed. ``errno`` is a positive errno or None."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


def _import_bindings():
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the host
        raise RbdError(
            "the Ceph Python bindings are not importable (install Debian's python3-rados and "
            "python3-rbd, and use /usr/bin/python3 or a venv made with --system-site-packages): "
            f"{e}") from e
    return rados, rbd


def _exc_errno(e: BaseException) -> int | None:
    n = getattr(e, "errno", None)
    if isinstance(n, int):
        return abs(n)
    return None


def _check_name(what: str, value, allow_none: bool = False, forbid: str = "") -> None:
    if value is None:
        if allow_none:
            return
        raise RbdError(f"{what} is required", _errno.EINVAL)
    if not isinstance(value, str):
        raise RbdError(f"{what} must be a string, not {type(value).__name__}", _errno.EINVAL)
    if value == "":
        raise RbdError(f"{what} must not be empty", _errno.EINVAL)
    if "\0" in value:
        raise RbdError(f"{what} must not contain NUL", _errno.EINVAL)
    bad = [c for c in forbid if c in value]
    if bad:
        raise RbdError(f"{what} {value!r} must not contain {''.join(bad)!r}", _errno.EINVAL)


def _readable_file(what: str, path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise RbdError(f"{what} must be a path, not {type(path).__name__}", _errno.EINVAL)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RbdError(f"{what} {path!r} does not exist or is not a file", _errno.ENOENT)
    if not os.access(path, os.R_OK):
        raise RbdError(f"{what} {path!r} is not readable", _errno.EACCES)
    return path


def normalize_client(client) -> str:
    """'admin' or 'client.admin' -> 'client.admin'. Only client entities may open images."""
    if client is None:
        return "client.admin"
    _check_name("client", client, forbid=" /@")
    if "." in client:
        typ, _, ident = client.partition(".")
        if typ != "client" or not ident:
            raise RbdError(f"client {client!r} must be an id ('admin') or a client name "
                           f"('client.admin')", _errno.EINVAL)
        return client
    return "client." + client


class RbdBackend:
    """An open RBD image with asynchronous IO.

    Callbacks are ``callback(err, data)``: ``err`` is 0 or a positive errno, ``data`` is the
    bytes read (reads only) or None. They run on librbd's completion thread; keep them short.
    """

    CLOSE_ON_ERROR_TIMEOUT = 10.0

    def __init__(self, cluster, ioctx, image, spec: str, read_only: bool, io_timeout: float):
        self._cluster = cluster
        self._ioctx = ioctx
        self._image = image
        self.spec = spec
        self._read_only = read_only
        self.io_timeout = io_timeout
        st = image.stat()
        self._size = st["size"]
        self._object_size = st["obj_size"]
        self._features = image.features()
        try:
            self._stripe_unit = image.stripe_unit()
        except Exception:
            self._stripe_unit = self._object_size
        try:
            self._discard_granularity = int(cluster.conf_get("rbd_discard_granularity_bytes"))
        except Exception:
            self._discard_granularity = 0
        try:
            cache = cluster.conf_get("rbd_cache").lower() == "true"
            policy = cluster.conf_get("rbd_cache_policy")
        except Exception:
            cache, policy = True, "writearound"
        self._write_cache = bool(cache and policy in ("writeback", "writearound") and not read_only)
        self._lock = threading.Lock()
        self._inflight = 0
        self._idle = threading.Condition(self._lock)
        self._closed = False

    # ---- opening ------------------------------------------------------------
    @classmethod
    def open(cls, pool: str, image: str, namespace: str | None = None,
             snapshot: str | None = None, conf: str | None = None, client: str | None = None,
             keyring: str | None = None, timeout: float = 30, *, read_only: bool = False,
             io_timeout: float = 0, options: dict | None = None) -> "RbdBackend":
        """Connect and open ``pool[/namespace]/image[@snapshot]``.

        Everything local (types, names, files, numbers) is checked before the cluster is
        contacted. Connecting and opening are bounded by ``timeout`` seconds (monitor
        session, monitor commands and the OSD reads done by the open). After the open,
        OSD operations use ``io_timeout`` (0 = wait for the cluster to recover, as the
        kernel rbd driver does). A snapshot is always opened read-only. ``options`` are
        extra Ceph config settings (strings) applied after the config file.
        """
        _check_name("pool", pool, forbid="/@")
        _check_name("image", image, forbid="/@")
        _check_name("namespace", namespace, allow_none=True, forbid="/@")
        _check_name("snapshot", snapshot, allow_none=True, forbid="/@")
        name = normalize_client(client)
        if conf is not None:
            conf = _readable_file("conf", conf)
        if keyring is not None:
            keyring = _readable_file("keyring", keyring)
        for what, v, lo in (("timeout", timeout, 1), ("io_timeout", io_timeout, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) \
                    or v < lo or v > 86400:
                raise RbdError(f"{what} must be a number of seconds in [{lo}, 86400], got {v!r}",
                               _errno.EINVAL)
        if options is not None and not (isinstance(options, dict) and
                                        all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in options.items())):
            raise RbdError("options must be a dict of str to str", _errno.EINVAL)
        read_only = bool(read_only or snapshot is not None)
        spec = f"{pool}/{namespace + '/' if namespace else ''}{image}" + \
            (f"@{snapshot}" if snapshot else "")

        rados, rbd = _import_bindings()
        secs = str(int(math.ceil(timeout)))
        # conf=None: librados' default search ($CEPH_CONF, /etc/ceph/ceph.conf,
        # ~/.ceph/config, ./ceph.conf), unless the options name the monitors themselves.
        has_mons = any(k.replace(" ", "_") in ("mon_host", "mon_dns_srv_name")
                       for k in (options or {}))
        conffile = conf if conf is not None else (None if has_mons else "")
        try:
            cluster = rados.Rados(name=name, conffile=conffile)
        except rados.Error as e:
            if conf is None:
                msg = ("no Ceph config file found (searched $CEPH_CONF, /etc/ceph/ceph.conf, "
                       "~/.ceph/config, ./ceph.conf); pass conf= or options={'mon_host': ...}")
            else:
                msg = f"cannot parse Ceph config {conf}: {e}"
            raise RbdError(msg, _exc_errno(e) or _errno.EINVAL) from e
        try:
            try:
                for k, v in (options or {}).items():
                    cluster.conf_set(k, v)
                if keyring is not None:
                    cluster.conf_set("keyring", keyring)
                cluster.conf_set("client_mount_timeout", secs)
                cluster.conf_set("rados_mon_op_timeout", secs)
                cluster.conf_set("rados_osd_op_timeout", secs)
            except rados.Error as e:
                raise RbdError(f"bad Ceph option in {sorted(options or {})}: {e}",
                               _errno.EINVAL) from e
            mon_host = cluster.conf_get("mon_host") or ""
            if not mon_host.strip():
                raise RbdError(f"no monitors configured: {conf or 'the default Ceph config'} "
                               "sets no 'mon host'", _errno.EINVAL)
            t0 = time.monotonic()
            try:
                cluster.connect(timeout=int(secs))
            except rados.Error as e:
                n = _exc_errno(e)
                el = time.monotonic() - t0
                if n in (_errno.EACCES, _errno.EPERM):
                    msg = (f"authentication as {name} rejected by the monitors {mon_host} "
                           f"(wrong key, or unknown client): {e}")
                elif n == _errno.ETIMEDOUT or el >= int(secs) - 0.5:
                    msg = (f"monitors {mon_host} unreachable: no session within {secs}s "
                           f"(client_mount_timeout): {e}")
                elif n == _errno.ENOENT:
                    msg = (f"no key for {name}: keyring "
                           f"{keyring or cluster.conf_get('keyring')!r} missing or lacks it: {e}")
                else:
                    msg = f"cannot connect to the Ceph monitors {mon_host} as {name}: {e}"
                raise RbdError(msg, n) from e
            try:
                ioctx = cluster.open_ioctx(pool)
            except rados.ObjectNotFound as e:
                raise RbdError(f"pool {pool!r} does not exist", _errno.ENOENT) from e
            except rados.Error as e:
                raise RbdError(f"cannot open pool {pool!r}: {e}", _exc_errno(e)) from e
            try:
                if namespace:
                    ioctx.set_namespace(namespace)
                try:
                    img = rbd.Image(ioctx, image, snapshot=snapshot, read_only=read_only)
                except rbd.ImageNotFound as e:
                    raise RbdError(cls._explain_enoent(rbd, ioctx, pool, namespace, image,
                                                       snapshot), _errno.ENOENT) from e
                except rbd.PermissionError as e:
                    raise RbdError(f"{name} may not open {spec} (check its OSD caps, e.g. "
                                   f"'profile rbd pool={pool}'): {e}", _errno.EPERM) from e
                except rbd.Error as e:
                    n = _exc_errno(e)
                    if n == _errno.ETIMEDOUT:
                        raise RbdError(f"opening {spec} timed out after {secs}s: the OSDs "
                                       f"did not answer (rados_osd_op_timeout)", n) from e
                    raise RbdError(f"cannot open image {spec}: {e}", n) from e
                try:
                    cluster.conf_set("rados_osd_op_timeout", str(int(math.ceil(io_timeout))))
                    return cls(cluster, ioctx, img, spec, read_only, io_timeout)
                except BaseException:
                    img.close()
                    raise
            except BaseException:
                ioctx.close()
                raise
        except BaseException:
            cluster.shutdown()
            raise

    @staticmethod
    def _explain_enoent(rbd, ioctx, pool, namespace, image, snapshot) -> str:
        where = f"pool {pool!r}" + (f" namespace {namespace!r}" if namespace else "")
        if namespace:
            try:
                ioctx.set_namespace("")
                exists = rbd.RBD().namespace_exists(ioctx, namespace)
                ioctx.set_namespace(namespace)
                if not exists:
                    return f"namespace {namespace!r} does not exist in pool {pool!r}"
            except Exception:
                pass
        if snapshot:
            try:
                rbd.Image(ioctx, image, read_only=True).close()
                return f"snapshot {snapshot!r} of image {image!r} does not exist in {where}"
            except Exception:
                pass
        return f"image {image!r} does not exist in {where}"

    # ---- properties ---------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def object_size(self) -> int:
        """Bytes per RADOS object: the natural discard granularity and max useful IO."""
        return self._object_size

    @property
    def stripe_unit(self) -> int:
        return self._stripe_unit

    @property
    def discard_granularity(self) -> int:
        """librbd ignores discards smaller than this (rbd_discard_granularity_bytes)."""
        return self._discard_granularity

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def write_cache(self) -> bool:
        """True when librbd may complete a write before the OSDs have it (the default:
        rbd_cache=true, rbd_cache_policy=writearound, after the first flush). The device
        then has a volatile write cache: flush and FUA must be passed through. Open with
        options={"rbd_cache": "false"} for write-through."""
        return self._write_cache

    @property
    def features(self) -> int:
        return self._features

    @property
    def inflight(self) -> int:
        return self._inflight

    def refresh_size(self) -> int:
        self._size = self._image.size()
        return self._size

    # ---- async IO -------------------------------------------------------------
    def _check(self, offset: int, length: int, write: bool) -> None:
        if self._closed:
            raise RbdError(f"{self.spec} is closed", _errno.EBADF)
        if write and self._read_only:
            raise RbdError(f"{self.spec} is read-only", _errno.EROFS)
        if offset < 0 or length < 0 or offset + length > self._size:
            raise RbdError(f"IO {offset}+{length} outside {self.spec} (size {self._size})",
                           _errno.EINVAL)

    def _start(self):
        with self._lock:
            self._inflight += 1

    def _done(self):
        with self._lock:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()

    def _wrap(self, callback: Callback, keep=None):
        def oncomplete(comp, data=None):
            r = comp.get_return_value()
            self._done()
            try:
                if r < 0:
                    callback(-r, None)
                else:
                    callback(0, data)
            except BaseException:  # never let an exception reach librbd's thread
                log.exception("rbd completion callback failed")
            keep  # noqa: B018 - hold the buffer until completion
        return oncomplete

    def _submit(self, fn, *args, **kw):
        self._start()
        try:
            fn(*args, **kw)
        except BaseException as e:
            self._done()
            if isinstance(e, Exception) and not isinstance(e, RbdError):
                raise RbdError(f"{self.spec}: submit failed: {e}", _exc_errno(e)) from e
            raise

    def aio_read(self, offset: int, length: int, callback: Callback) -> None:
        """Read; callback(0, bytes_of_length) or callback(errno, None)."""
        self._check(offset, length, False)
        self._submit(self._image.aio_read, offset, length, self._wrap(callback))

    def aio_readinto(self, offset: int, buf, callback: Callable[[int], None]) -> None:
        """Read into a writable buffer (one copy, see module doc); callback(err)."""
        mv = memoryview(buf).cast("B")
        n = len(mv)

        def done(err, data):
            if not err:
                mv[:] = data
            callback(err)
        self.aio_read(offset, n, done)

    def aio_write(self, offset: int, data, callback: Callback, fua: bool = False) -> None:
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)
        self._check(offset, len(data), True)
        flags = LIBRADOS_OP_FLAG_FADVISE_FUA if fua else 0
        self._submit(self._image.aio_write, data, offset, self._wrap(callback, data),
                     fadvise_flags=flags)

    def aio_flush(self, callback: Callback) -> None:
        self._check(0, 0, False)
        self._submit(self._image.aio_flush, self._wrap(callback))

    def aio_discard(self, offset: int, length: int, callback: Callback) -> None:
        """Advisory: librbd may keep data it cannot deallocate (see discard_granularity)."""
        self._check(offset, length, True)
        self._submit(self._image.aio_discard, offset, length, self._wrap(callback))

    def aio_write_zeroes(self, offset: int, length: int, callback: Callback,
                         zero_flags: int = 0) -> None:
        """The range reads back as zeroes afterwards (whole objects are deallocated unless
        ``zero_flags`` has RBD_WRITE_ZEROES_FLAG_THICK_PROVISION, 1)."""
        self._check(offset, length, True)
        kw = {"zero_flags": zero_flags} if zero_flags else {}
        self._submit(self._image.aio_write_zeroes, offset, length, self._wrap(callback), **kw)

    # ---- life cycle -----------------------------------------------------------
    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` s (None: forever) for in-flight IO, then close the image
        (librbd flushes its cache and releases the exclusive lock) and the connection.

        If IO is still in flight when the timeout expires (e.g. the OSDs are gone and
        io_timeout is 0), raise RbdError(EBUSY) and leave everything open: closing would
        block inside librbd until the cluster answers.
        """
        if self._closed:
            return
        if not self.wait_idle(timeout):
            raise RbdError(f"{self.spec}: {self._inflight} IOs still in flight after "
                           f"{timeout}s; not closing", _errno.EBUSY)
        self._closed = True
        try:
            self._image.close()
        finally:
            try:
                self._ioctx.close()
            finally:
                self._cluster.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
            return
        # Already failing: do not hang on a dead cluster, and do not hide the error.
        try:
            self.close(timeout=self.CLOSE_ON_ERROR_TIMEOUT)
        except RbdError as e:
            log.warning("%s", e)

    def sync(self, timeout: float | None = 60) -> "SyncRbd":
        return SyncRbd(self, timeout)


class SyncRbd:
    """Blocking wrappers over the async calls, for tests and tools. Raises RbdError."""

    def __init__(self, backend: RbdBackend, timeout: float | None = 60):
        self.b = backend
        self.timeout = timeout

    def _call(self, what: str, fn, *args, **kw):
        ev = threading.Event()
        out = []

        def cb(err, data=None):
            out.append((err, data))
            ev.set()
        fn(*args, cb, **kw)
        if not ev.wait(self.timeout):
            raise RbdError(f"{self.b.spec}: {what} did not complete in {self.timeout}s",
                           _errno.ETIMEDOUT)
        err, data = out[0]
        if err:
            raise RbdError(f"{self.b.spec}: {what} failed: {os.strerror(err)}", err)
        return data

    def read(self, offset: int, length: int) -> bytes:
        return self._call("read", self.b.aio_read, offset, length)

    def write(self, offset: int, data, fua: bool = False) -> None:
        self._call("write", self.b.aio_write, offset, data, fua=fua)

    def flush(self) -> None:
        self._call("flush", self.b.aio_flush)

    def discard(self, offset: int, length: int) -> None:
        self._call("discard", self.b.aio_discard, offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._call("write_zeroes", self.b.aio_write_zeroes, offset, length)
