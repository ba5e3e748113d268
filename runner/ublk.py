"""Control side of the embeddable ublk library: kernel features, adding, starting, stopping and
deleting devices, and listing what the kernel has.

The library never creates a thread and never forks.  A :class:`Device` owns one control ring and
the device's char device; its queues (:mod:`runner.queue`) are served by threads the caller owns.
Kernel refusals raise :class:`UblkError`, which names the command, the device and the errno.
"""
from __future__ import annotations

import atexit
import errno as _errno
import glob
import os
import threading
import time
import weakref
from dataclasses import dataclass, field

from .core import ffi, lib

AUTO_ID = 0xFFFFFFFF
NO_QUEUE = 0xFFFF
DEFAULT_TIMEOUT = 30.0
# Stored by the kernel in dev_info.ublksrv_flags and ignored by it: marks devices we created, so
# the cleanup helper never touches another server's devices.
OWNER_MAGIC = 0x75626C6B_72756E00  # "ublkrun\0"

F_SUPPORT_ZERO_COPY = 1 << 0
F_URING_CMD_COMP_IN_TASK = 1 << 1
F_NEED_GET_DATA = 1 << 2
F_USER_RECOVERY = 1 << 3
F_USER_RECOVERY_REISSUE = 1 << 4
F_UNPRIVILEGED_DEV = 1 << 5
F_CMD_IOCTL_ENCODE = 1 << 6
F_USER_COPY = 1 << 7
F_ZONED = 1 << 8
F_USER_RECOVERY_FAIL_IO = 1 << 9
F_UPDATE_SIZE = 1 << 10
F_AUTO_BUF_REG = 1 << 11
F_QUIESCE = 1 << 12
F_PER_IO_DAEMON = 1 << 13

FEATURE_NAMES = {bit: name[2:] for name, bit in dict(globals()).items() if name.startswith("F_")}

STATE_NAMES = {0: "DEAD", 1: "LIVE", 2: "QUIESCED", 3: "FAIL_IO"}

ATTR_READ_ONLY = 1 << 0
ATTR_ROTATIONAL = 1 << 1
ATTR_VOLATILE_CACHE = 1 << 2
ATTR_FUA = 1 << 3
PARAM_BASIC = 1 << 0
PARAM_DISCARD = 1 << 1

_COMMANDS = {
    "GET_QUEUE_AFFINITY": lib.UBLK_U_CMD_GET_QUEUE_AFFINITY,
    "GET_DEV_INFO": lib.UBLK_U_CMD_GET_DEV_INFO,
    "ADD_DEV": lib.UBLK_U_CMD_ADD_DEV,
    "DEL_DEV": lib.UBLK_U_CMD_DEL_DEV,
    "START_DEV": lib.UBLK_U_CMD_START_DEV,
    "STOP_DEV": lib.UBLK_U_CMD_STOP_DEV,
    "SET_PARAMS": lib.UBLK_U_CMD_SET_PARAMS,
    "GET_PARAMS": lib.UBLK_U_CMD_GET_PARAMS,
    "START_USER_RECOVERY": lib.UBLK_U_CMD_START_USER_RECOVERY,
    "END_USER_RECOVERY": lib.UBLK_U_CMD_END_USER_RECOVERY,
    "GET_FEATURES": lib.UBLK_U_CMD_GET_FEATURES,
    "DEL_DEV_ASYNC": lib.UBLK_U_CMD_DEL_DEV_ASYNC,
}


def flag_names(flags: int) -> list[str]:
    """Names of the UBLK_F_* bits set in ``flags`` (unknown bits as hex)."""
    names = [name for bit, name in FEATURE_NAMES.items() if flags & bit]
    unknown = flags & ~sum(FEATURE_NAMES)
    if unknown:
        names.append(hex(unknown))
    return names


class UblkError(OSError):
    """A ublk command failed.  ``errno`` is the kernel's; the message names command and device."""

    def __init__(self, err: int, command: str, dev_id: int | None = None, detail: str = ""):
        self.command = command
        self.dev_id = dev_id
        dev = "auto" if dev_id in (None, AUTO_ID) else str(dev_id)
        name = _errno.errorcode.get(err, f"errno {err}")
        what = f"{command} (ublk device {dev}{', ' + detail if detail else ''})"
        if err == _errno.ETIMEDOUT:
            msg = f"{what} timed out and was cancelled"
        else:
            msg = f"{what} failed: {name} ({os.strerror(err)})"
        super().__init__(err, msg)

    def __str__(self) -> str:
        return self.strerror


def _timeout_ms(timeout: float | None) -> int:
    return -1 if timeout is None else max(0, int(timeout * 1000))


def _payload(buf):
    """(pointer, size) of a control payload: a cffi pointer to a struct or integer, or None."""
    if buf is None:
        return ffi.NULL, 0
    return buf, ffi.sizeof(ffi.typeof(buf).item)


class Control:
    """One control ring on ``/dev/ublk-control``.  Not thread-safe: one per thread or device."""

    def __init__(self):
        self._c = None  # __del__ runs even when the open below fails
        pp = ffi.new("struct ubc **")
        ret = lib.ubc_open(pp)
        if ret < 0:
            hint = " (is the ublk_drv module loaded? try: modprobe ublk_drv)" if ret == -_errno.ENOENT else ""
            raise UblkError(-ret, "open /dev/ublk-control", detail=hint.strip(" ()") if hint else "")
        self._c = pp[0]
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._c is not None:
            lib.ubc_close(self._c)
            self._c = None

    def __del__(self):
        self.close()

    def fileno(self) -> int:
        return lib.ubc_event_fd(self._c)

    def command(self, name: str, dev_id: int, buf=None, *, data0: int = 0, q_id: int = NO_QUEUE,
                timeout: float | None = DEFAULT_TIMEOUT, detail: str = "") -> int:
        """Run one control command; returns its non-negative result or raises UblkError."""
        ptr, size = _payload(buf)
        with self._lock:
            ret = lib.ubc_cmd(self._c, _COMMANDS[name], dev_id, q_id, ptr, size, data0, _timeout_ms(timeout))
        if ret < 0:
            raise UblkError(-ret, name, dev_id, detail)
        return ret

    def submit(self, name: str, dev_id: int, buf=None, *, data0: int = 0) -> None:
        """Start a command without waiting; finish it with :meth:`reap` (see :mod:`runner.aio`)."""
        ptr, size = _payload(buf)
        ret = lib.ubc_submit(self._c, _COMMANDS[name], dev_id, NO_QUEUE, ptr, size, data0)
        if ret < 0:
            raise UblkError(-ret, name, dev_id)

    def reap(self, name: str, dev_id: int, buf=None, timeout: float | None = 0) -> int | None:
        """Result of the submitted command, or None if it is still running (timeout 0)."""
        ptr, size = _payload(buf)
        ret = lib.ubc_reap(self._c, _timeout_ms(timeout), ptr, size)
        if ret == -_errno.EAGAIN:
            return None
        if ret < 0:
            raise UblkError(-ret, name, dev_id)
        return ret


_shared = threading.local()


def _control() -> Control:
    ctl = getattr(_shared, "control", None)
    if ctl is None:
        ctl = _shared.control = Control()
    return ctl


def get_features() -> int:
    """The UBLK_F_* flags the running kernel supports (GET_FEATURES; 6.5+)."""
    buf = ffi.new("uint64_t *")
    _control().command("GET_FEATURES", 0, buf)
    return int(buf[0])


def available() -> bool:
    """True when /dev/ublk-control exists (the ublk_drv module is loaded)."""
    return os.path.exists("/dev/ublk-control")


@dataclass(frozen=True)
class DeviceInfo:
    dev_id: int
    state: str
    nr_queues: int
    depth: int
    max_io_bytes: int
    flags: int
    pid: int
    owner_uid: int
    owner_gid: int
    ours: bool

    @property
    def char_path(self) -> str:
        return f"/dev/ublkc{self.dev_id}"

    @property
    def block_path(self) -> str:
        return f"/dev/ublkb{self.dev_id}"

    @property
    def server_alive(self) -> bool:
        if self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def as_dict(self) -> dict:
        return {
            "id": self.dev_id, "state": self.state, "queues": self.nr_queues, "depth": self.depth,
            "max_io_bytes": self.max_io_bytes, "flags": flag_names(self.flags), "pid": self.pid,
            "block": self.block_path, "char": self.char_path, "ours": self.ours,
        }


def _info_from(raw) -> DeviceInfo:
    return DeviceInfo(
        dev_id=raw.dev_id, state=STATE_NAMES.get(raw.state, str(raw.state)),
        nr_queues=raw.nr_hw_queues, depth=raw.queue_depth, max_io_bytes=raw.max_io_buf_bytes,
        flags=raw.flags, pid=raw.ublksrv_pid, owner_uid=raw.owner_uid, owner_gid=raw.owner_gid,
        ours=raw.ublksrv_flags == OWNER_MAGIC,
    )


def device_info(dev_id: int, control: Control | None = None) -> DeviceInfo:
    raw = ffi.new("struct ublksrv_ctrl_dev_info *")
    (control or _control()).command("GET_DEV_INFO", dev_id, raw, timeout=5)
    return _info_from(raw)


def list_devices() -> list[DeviceInfo]:
    """Every ublk device the kernel has, with its state (from sysfs ids + GET_DEV_INFO)."""
    ids = sorted(int(p.rsplit("ublkc", 1)[1]) for p in glob.glob("/sys/class/ublk-char/ublkc*"))
    out = []
    for dev_id in ids:
        try:
            out.append(device_info(dev_id))
        except UblkError as e:
            if e.errno != _errno.ENODEV:  # deleted between listing and asking
                raise
    return out


def remove_device(dev_id: int, timeout: float = 10.0, *, stop: bool = True,
                  control: Control | None = None) -> bool:
    """STOP_DEV (unless ``stop`` is false) and DEL_DEV the device ``dev_id``; False if it was
    already gone.  IO still queued in the kernel fails with EIO.  A device that is already
    stopped (DEAD) refuses STOP_DEV, which is fine: DEL_DEV removes it.  If DEL_DEV is not done
    within ``timeout`` (someone still holds its char device), the kernel finishes the deletion
    by itself when the last reference drops (DEL_DEV_ASYNC)."""
    ctl = control or _control()
    if stop:
        try:
            ctl.command("STOP_DEV", dev_id, timeout=timeout)
        except UblkError as e:
            if e.errno == _errno.ENODEV:
                return False
    try:
        ctl.command("DEL_DEV", dev_id, timeout=timeout)
    except UblkError as e:
        if e.errno == _errno.ETIMEDOUT:
            ctl.command("DEL_DEV_ASYNC", dev_id, timeout=5)
        elif e.errno == _errno.ENODEV:
            return False
        else:
            raise
    return True


def cleanup_dead(*, only_ours: bool = True, include_quiesced: bool = False,
                 timeout: float = 10.0) -> list[int]:
    """Delete devices whose server process is gone (e.g. killed with SIGKILL).

    DEAD devices keep their id and char device until someone sends DEL_DEV; QUIESCED ones wait
    for user recovery and are only deleted when ``include_quiesced`` is set.  Returns the ids.
    """
    deleted = []
    ctl = _control()
    for info in list_devices():
        if only_ours and not info.ours:
            continue
        if info.server_alive and info.state == "LIVE":
            continue
        if info.state == "QUIESCED" and not include_quiesced:
            continue
        if remove_device(info.dev_id, timeout, stop=info.state in ("LIVE", "QUIESCED"), control=ctl):
            deleted.append(info.dev_id)
    return deleted


@dataclass
class Params:
    """Device parameters (SET_PARAMS/GET_PARAMS).  Sizes are in bytes."""
    size: int
    logical_block_size: int = 512
    physical_block_size: int = 0          # 0: same as logical
    io_min: int = 0                       # 0: physical block size
    io_opt: int = 0                       # 0: same as io_min
    max_request_bytes: int = 0            # 0: the device's max IO buffer
    chunk_bytes: int = 0                  # requests never cross a multiple of this (0: no limit)
    read_only: bool = False
    rotational: bool = False
    volatile_cache: bool = False          # the kernel sends FLUSH only when set
    fua: bool = False                     # honoured only together with volatile_cache
    discard_granularity: int = 0          # 0: no DISCARD/WRITE_ZEROES requests
    discard_alignment: int = 0
    max_discard_bytes: int = 0
    max_write_zeroes_bytes: int = 0
    devt: tuple = field(default=(), compare=False)   # (char major, minor, disk major, minor), kernel-filled

    def to_c(self, max_io_bytes: int):
        p = ffi.new("struct ublk_params *")
        p.len = ffi.sizeof("struct ublk_params")
        p.types = PARAM_BASIC
        b = p.basic
        lbs = self.logical_block_size
        pbs = self.physical_block_size or lbs
        io_min = self.io_min or pbs
        io_opt = self.io_opt or io_min
        b.attrs = ((ATTR_READ_ONLY if self.read_only else 0) | (ATTR_ROTATIONAL if self.rotational else 0)
                   | (ATTR_VOLATILE_CACHE if self.volatile_cache else 0) | (ATTR_FUA if self.fua else 0))
        b.logical_bs_shift = _shift(lbs, "logical_block_size")
        b.physical_bs_shift = _shift(pbs, "physical_block_size")
        b.io_min_shift = _shift(io_min, "io_min")
        b.io_opt_shift = _shift(io_opt, "io_opt")
        b.max_sectors = (self.max_request_bytes or max_io_bytes) >> 9
        b.chunk_sectors = self.chunk_bytes >> 9
        b.dev_sectors = self.size >> 9
        if self.discard_granularity or self.max_write_zeroes_bytes:
            p.types |= PARAM_DISCARD
            d = p.discard
            d.discard_granularity = self.discard_granularity or lbs
            d.discard_alignment = self.discard_alignment
            d.max_discard_sectors = self.max_discard_bytes >> 9
            d.max_write_zeroes_sectors = self.max_write_zeroes_bytes >> 9
            d.max_discard_segments = 1 if self.max_discard_bytes else 0
        return p

    @classmethod
    def from_c(cls, p) -> "Params":
        b, d, t = p.basic, p.discard, p.devt
        has_discard = bool(p.types & PARAM_DISCARD)
        return cls(
            size=b.dev_sectors << 9, logical_block_size=1 << b.logical_bs_shift,
            physical_block_size=1 << b.physical_bs_shift, io_min=1 << b.io_min_shift,
            io_opt=1 << b.io_opt_shift, max_request_bytes=b.max_sectors << 9,
            chunk_bytes=b.chunk_sectors << 9, read_only=bool(b.attrs & ATTR_READ_ONLY),
            rotational=bool(b.attrs & ATTR_ROTATIONAL), volatile_cache=bool(b.attrs & ATTR_VOLATILE_CACHE),
            fua=bool(b.attrs & ATTR_FUA),
            discard_granularity=d.discard_granularity if has_discard else 0,
            discard_alignment=d.discard_alignment if has_discard else 0,
            max_discard_bytes=(d.max_discard_sectors << 9) if has_discard else 0,
            max_write_zeroes_bytes=(d.max_write_zeroes_sectors << 9) if has_discard else 0,
            devt=(t.char_major, t.char_minor, t.disk_major, t.disk_minor),
        )


def _shift(value: int, name: str) -> int:
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value.bit_length() - 1


# Devices this process created and has not deleted: stopped and deleted at interpreter exit.
_live_devices: "weakref.WeakSet[Device]" = weakref.WeakSet()


@atexit.register
def _cleanup_at_exit() -> None:
    for dev in list(_live_devices):
        dev._emergency_cleanup()


class Device:
    """One ublk device created by this process.

    Lifecycle: :meth:`add` (ADD_DEV + SET_PARAMS) → open each queue in the thread that serves it
    (:meth:`open_queue`) → :meth:`start` (from another thread: START_DEV waits for every queue's
    FETCHes and then reads the partition table through them) → serve → :meth:`stop` → queue
    threads see :class:`~runner.queue.QueueStopped` and close their queues → :meth:`delete`.
    Used as a context manager it is stopped and deleted on exit, also on exceptions and Ctrl-C;
    at interpreter exit any device still alive is stopped and deleted too.
    """

    def __init__(self, info: DeviceInfo, params: Params, control: Control, cdev_fd: int,
                 timeout: float):
        self.info = info
        self.params = params
        self.timeout = timeout
        self._ctl = control
        self._cdev_fd = cdev_fd
        self._started = False
        self._stopped = False
        self._deleted = False
        self._recovering = False
        self._queues: "weakref.WeakSet" = weakref.WeakSet()
        _live_devices.add(self)

    # ---- creation
    @classmethod
    def add(cls, size: int, *, dev_id: int | None = None, queues: int = 1, depth: int = 128,
            max_io_bytes: int = 1 << 20, user_copy: bool | None = None, need_get_data: bool = False,
            recovery: str | None = None, timeout: float = DEFAULT_TIMEOUT, **param_kw) -> "Device":
        """Create a device (not started).

        ``user_copy``: None uses USER_COPY when the kernel has it (6.5+), else buffer mode.
        ``need_get_data`` applies to buffer mode.  ``recovery``: None, "requeue" (USER_RECOVERY)
        or "reissue" (USER_RECOVERY_REISSUE).  Other keywords are :class:`Params` fields.
        """
        params = Params(size=size, **param_kw)
        ctl = Control()
        try:
            features = get_features()
            if not features & F_CMD_IOCTL_ENCODE:
                raise UblkError(_errno.EOPNOTSUPP, "GET_FEATURES", dev_id,
                                "kernel lacks CMD_IOCTL_ENCODE (needs 6.5+; Debian 12: the 6.12 kernel)")
            if user_copy is None:
                user_copy = bool(features & F_USER_COPY)
            flags = 0
            if user_copy:
                flags |= F_USER_COPY
            elif need_get_data:
                flags |= F_NEED_GET_DATA
            if recovery == "requeue":
                flags |= F_USER_RECOVERY
            elif recovery == "reissue":
                flags |= F_USER_RECOVERY | F_USER_RECOVERY_REISSUE
            elif recovery not in (None, "none"):
                raise ValueError(f"recovery must be None, 'requeue' or 'reissue', not {recovery!r}")
            missing = flags & ~features
            if missing:
                raise UblkError(_errno.EOPNOTSUPP, "ADD_DEV", dev_id,
                                f"kernel lacks {', '.join(flag_names(missing))}")
            raw = ffi.new("struct ublksrv_ctrl_dev_info *")
            raw.nr_hw_queues = queues
            raw.queue_depth = depth
            raw.max_io_buf_bytes = max_io_bytes
            raw.dev_id = AUTO_ID if dev_id is None or dev_id < 0 else dev_id
            raw.ublksrv_pid = os.getpid()
            raw.flags = flags
            raw.ublksrv_flags = OWNER_MAGIC
            detail = f"queues={queues} depth={depth} max_io_bytes={max_io_bytes} flags={'|'.join(flag_names(flags)) or 0}"
            ctl.command("ADD_DEV", raw.dev_id, raw, timeout=timeout, detail=detail)
            info = _info_from(raw)
        except BaseException:
            ctl.close()
            raise
        try:
            if info.nr_queues != queues:
                raise UblkError(_errno.EINVAL, "ADD_DEV", info.dev_id,
                                f"kernel gave {info.nr_queues} queues for {queues} asked (nr_cpu_ids limit)")
            cp = params.to_c(info.max_io_bytes)
            p_detail = (f"size={params.size} lbs={params.logical_block_size} "
                        f"max_sectors={cp.basic.max_sectors} (max_io_bytes={info.max_io_bytes})")
            ctl.command("SET_PARAMS", info.dev_id, cp, timeout=timeout, detail=p_detail)
            got = ffi.new("struct ublk_params *")
            got.len = ffi.sizeof("struct ublk_params")
            ctl.command("GET_PARAMS", info.dev_id, got, timeout=timeout)
            params = Params.from_c(got)
            if bool(cp.types & PARAM_DISCARD) != bool(got.types & PARAM_DISCARD):
                raise UblkError(_errno.EINVAL, "SET_PARAMS", info.dev_id, "kernel dropped the DISCARD block")
            cdev_fd = _open_cdev(info.dev_id, timeout)
        except BaseException:
            try:
                ctl.command("DEL_DEV", info.dev_id, timeout=timeout)
            finally:
                ctl.close()
            raise
        return cls(info, params, ctl, cdev_fd, timeout)

    @classmethod
    def recover(cls, dev_id: int, *, timeout: float = DEFAULT_TIMEOUT, size: int | None = None,
                queues: int | None = None, depth: int | None = None,
                foreign_ok: bool = False) -> "Device":
        """Take over a QUIESCED device whose server died (user recovery).

        Sends START_USER_RECOVERY; the kernel refuses it (EBUSY) while anyone still holds the old
        server's char device, so that is retried until ``timeout``.  Then open the queues as after
        :meth:`add` and call :meth:`start`, which sends END_USER_RECOVERY instead of START_DEV.
        ``size``/``queues``/``depth``, when given, must match what the device was created with:
        the kernel keeps the old parameters, so a mismatch would serve the wrong layout.
        """
        ctl = Control()
        try:
            raw = ffi.new("struct ublksrv_ctrl_dev_info *")
            ctl.command("GET_DEV_INFO", dev_id, raw, timeout=timeout)
            info = _info_from(raw)
            if not info.ours and not foreign_ok:
                raise UblkError(_errno.EPERM, "START_USER_RECOVERY", dev_id,
                                "the device was not created by ublk-runner (ublksrv_flags differ)")
            if not info.flags & F_USER_RECOVERY:
                raise UblkError(_errno.EINVAL, "START_USER_RECOVERY", dev_id,
                                "the device was created without USER_RECOVERY")
            if info.state != "QUIESCED":
                alive = f", server pid {info.pid} still alive" if info.server_alive else ""
                raise UblkError(_errno.EBUSY, "START_USER_RECOVERY", dev_id,
                                f"the device is {info.state}, not QUIESCED{alive}")
            got = ffi.new("struct ublk_params *")
            got.len = ffi.sizeof("struct ublk_params")
            ctl.command("GET_PARAMS", dev_id, got, timeout=timeout)
            params = Params.from_c(got)
            for what, want, have in (("size", size, params.size), ("queues", queues, info.nr_queues),
                                     ("depth", depth, info.depth)):
                if want is not None and want != have:
                    raise UblkError(_errno.EINVAL, "START_USER_RECOVERY", dev_id,
                                    f"{what} is {have} in the kernel but {want} now")
            deadline = time.monotonic() + timeout
            while True:
                try:
                    ctl.command("START_USER_RECOVERY", dev_id,
                                timeout=max(0.1, deadline - time.monotonic()))
                    break
                except UblkError as e:
                    # the dead server's char device is released asynchronously (task exit)
                    if e.errno == _errno.EBUSY and time.monotonic() > deadline:
                        raise UblkError(e.errno, "START_USER_RECOVERY", dev_id,
                                        f"/dev/ublkc{dev_id} is still open: is the old server "
                                        "(or a child it forked) still alive?") from None
                    if e.errno != _errno.EBUSY:
                        raise
                    time.sleep(0.05)
            cdev_fd = _open_cdev(dev_id, max(0.1, deadline - time.monotonic()))
        except BaseException:
            ctl.close()
            raise
        dev = cls(info, params, ctl, cdev_fd, timeout)
        dev._recovering = True
        return dev

    # ---- properties
    @property
    def dev_id(self) -> int:
        return self.info.dev_id

    @property
    def block_path(self) -> str:
        return self.info.block_path

    @property
    def char_path(self) -> str:
        return self.info.char_path

    @property
    def user_copy(self) -> bool:
        return bool(self.info.flags & F_USER_COPY)

    @property
    def cdev_fd(self) -> int:
        return self._cdev_fd

    def __repr__(self) -> str:
        return f"<ublk Device {self.dev_id} {self.params.size} bytes flags={'|'.join(flag_names(self.info.flags))}>"

    # ---- queues
    def open_queue(self, q_id: int, **kw):
        """Open queue ``q_id`` in the calling thread, which becomes its only server (the kernel's
        rule); FETCHes every tag.  See :class:`runner.queue.Queue`."""
        from .queue import Queue
        if not 0 <= q_id < self.info.nr_queues:
            raise ValueError(f"device {self.dev_id} has queues 0..{self.info.nr_queues - 1}, not {q_id}")
        q = Queue(self, q_id, **kw)
        self._queues.add(q)
        return q

    # ---- lifecycle
    def start(self, timeout: float | None = None) -> None:
        """START_DEV.  Blocks until every queue has fetched its tags, so call it from a thread
        other than the queue threads (or use :func:`runner.aio.start`)."""
        cmd = "END_USER_RECOVERY" if self._recovering else "START_DEV"
        self._ctl.command(cmd, self.dev_id, data0=os.getpid(),
                          timeout=self.timeout if timeout is None else timeout)
        self._started = True
        self._recovering = False

    def stop(self, timeout: float | None = None) -> None:
        """STOP_DEV: removes the disk after in-flight IO completes, then aborts every queue.
        Queue threads must keep serving until they see QueueStopped."""
        if self._stopped or self._deleted:
            return
        self._ctl.command("STOP_DEV", self.dev_id, timeout=self.timeout if timeout is None else timeout)
        self._stopped = True

    def delete(self, timeout: float | None = None) -> None:
        """DEL_DEV after closing our char device fd.  The kernel waits for every reference to the
        char device (open queues included); if that takes longer than ``timeout`` the deletion is
        finished asynchronously by the kernel (DEL_DEV_ASYNC) once the references drop."""
        if self._deleted:
            return
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while any(not q.closed for q in list(self._queues)) and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._cdev_fd >= 0:
            os.close(self._cdev_fd)
            self._cdev_fd = -1
        remove_device(self.dev_id, max(0.1, deadline - time.monotonic()), stop=False, control=self._ctl)
        self._deleted = True
        _live_devices.discard(self)
        self._ctl.close()

    def refresh_info(self) -> DeviceInfo:
        raw = ffi.new("struct ublksrv_ctrl_dev_info *")
        self._ctl.command("GET_DEV_INFO", self.dev_id, raw, timeout=5)
        return _info_from(raw)

    def get_params(self) -> Params:
        got = ffi.new("struct ublk_params *")
        got.len = ffi.sizeof("struct ublk_params")
        self._ctl.command("GET_PARAMS", self.dev_id, got, timeout=5)
        return Params.from_c(got)

    def close(self, timeout: float | None = None) -> None:
        """Stop (if started) and delete."""
        try:
            if self._started:
                self.stop(timeout)
        finally:
            self.delete(timeout)

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _emergency_cleanup(self) -> None:
        # At exit queue threads may still hold the char device; DEL_DEV_ASYNC lets the kernel
        # finish once the process is gone instead of blocking here.
        if self._deleted:
            return
        try:
            if self._started and not self._stopped:
                self._ctl.command("STOP_DEV", self.dev_id, timeout=5)
            self._ctl.command("DEL_DEV_ASYNC", self.dev_id, timeout=5)
        except UblkError:
            pass
        self._deleted = True


def _open_cdev(dev_id: int, timeout: float) -> int:
    # devtmpfs creates the node synchronously, but udev may hold the single-open cdev briefly.
    path = f"/dev/ublkc{dev_id}"
    deadline = time.monotonic() + min(timeout, 3.0)
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in (_errno.ENOENT, _errno.EBUSY) or time.monotonic() > deadline:
                raise UblkError(e.errno, f"open {path}", dev_id) from None
            time.sleep(0.1)
