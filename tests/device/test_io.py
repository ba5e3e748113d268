import fcntl
import mmap
import os
import struct
import subprocess

import pytest

from runner.queue import OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE, OP_WRITE_ZEROES

from .memserver import MemServer

pytestmark = pytest.mark.device

BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

FIO_VERIFY = ["--name=verify", "--ioengine=io_uring", "--direct=1", "--rw=randwrite", "--bs=8k",
              "--iodepth=32", "--size=24M", "--verify=crc32c", "--do_verify=1",
              "--verify_state_save=0", "--randrepeat=0", "--output-format=terse"]


def run_fio(fio, dev, *extra):
    p = subprocess.run([fio, f"--filename={dev}", *FIO_VERIFY, *extra], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verify" not in p.stderr.lower() or "bad" not in p.stderr.lower(), p.stderr
    return p


MODES = [
    pytest.param(dict(queues=1, mode="thread"), id="1q-thread"),
    pytest.param(dict(queues=2, mode="thread"), id="2q-thread"),
    pytest.param(dict(queues=1, mode="remote"), id="1q-completed-from-other-threads"),
    pytest.param(dict(queues=2, mode="asyncio"), id="2q-asyncio"),
    pytest.param(dict(queues=1, mode="thread", user_copy=False), id="1q-buffer-mode"),
    pytest.param(dict(queues=2, mode="thread", user_copy=False, need_get_data=True),
                 id="2q-buffer-mode-need-get-data"),
]


@pytest.mark.parametrize("kw", MODES)
def test_fio_crc32c_verify(fio, kw):
    with MemServer(size=32 << 20, **kw) as srv:
        if kw.get("user_copy") is False:
            assert not srv.dev.user_copy
            assert bool(srv.dev.info.flags & 4) == bool(kw.get("need_get_data"))
        run_fio(fio, srv.dev.block_path)
        writes = [e for e in srv.log if e[0] == OP_WRITE]
        assert len(writes) >= (24 << 20) // (8 << 10)


def _aligned(n):
    m = mmap.mmap(-1, n)
    return m


@pytest.mark.parametrize("user_copy", [True, False], ids=["user-copy", "buffer-mode"])
def test_every_op_lands_with_its_offset_and_length(user_copy):
    kw = dict(volatile_cache=True, fua=True, discard_granularity=4096,
              max_discard_bytes=16 << 20, max_write_zeroes_bytes=16 << 20, user_copy=user_copy)
    with MemServer(size=32 << 20, **kw) as srv:
        fd = os.open(srv.dev.block_path, os.O_RDWR | os.O_DIRECT)
        try:
            srv.log.clear()
            buf = _aligned(12288)
            buf[:] = os.urandom(12288)
            assert os.pwrite(fd, buf, 5 << 20) == 12288
            assert (OP_WRITE, 5 << 20, 12288, 0) in srv.log
            assert bytes(srv.mem[5 << 20:(5 << 20) + 12288]) == buf[:]

            back = _aligned(12288)
            srv.log.clear()
            assert os.preadv(fd, [back], 5 << 20) == 12288
            assert back[:] == buf[:]
            assert srv.log == [(OP_READ, 5 << 20, 12288, 0)]

            srv.log.clear()
            os.fsync(fd)
            assert any(e[0] == OP_FLUSH for e in srv.log), srv.log

            srv.log.clear()
            fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", 8 << 20, 1 << 20))
            assert (OP_DISCARD, 8 << 20, 1 << 20) in [e[:3] for e in srv.log], srv.log

            srv.log.clear()
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", 5 << 20, 8192))
            assert (OP_WRITE_ZEROES, 5 << 20, 8192) in [e[:3] for e in srv.log], srv.log
            assert bytes(srv.mem[5 << 20:(5 << 20) + 8192]) == bytes(8192)

            # FUA: O_DSYNC direct writes carry REQ_FUA when the device says it has FUA
            os.close(fd)
            fd = os.open(srv.dev.block_path, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
            srv.log.clear()
            os.pwrite(fd, buf, 1 << 20)
            assert any(e[0] == OP_WRITE and e[3] & (1 << 13) for e in srv.log), srv.log
        finally:
            os.close(fd)


def test_errors_from_the_backend_reach_the_reader():
    with MemServer(size=8 << 20) as srv:
        orig = srv.serve_one

        def failing(q, r):
            if r.op == OP_READ and r.offset == 4 << 20:
                q.complete(r, -5)
            else:
                orig(q, r)
        srv.serve_one = failing
        fd = os.open(srv.dev.block_path, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = _aligned(4096)
            with pytest.raises(OSError) as ei:
                os.preadv(fd, [buf], 4 << 20)
            assert ei.value.errno == 5
            assert os.preadv(fd, [buf], 0) == 4096  # the device keeps serving
        finally:
            os.close(fd)
