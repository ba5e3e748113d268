"""Simulated power loss: every pwrite and fdatasync of a workload is logged; an image
is rebuilt from all writes before some sync plus a random subset of the writes after it
(anything not synced may or may not have reached the disk). Each rebuilt image must pass
`qemu-img check` with 0 or 3 (leaks only), and every generation acknowledged by a flush
that completed before that sync must read back."""
import os
import random
import sys
from pathlib import Path

import pytest

from qcow2_helpers import check_rc, qemu_img, qemu_io, to_raw
from ublk_plugins.qcow2 import engine
from ublk_plugins.qcow2 import Qcow2Image

sys.path.insert(0, str(Path(__file__).parent))
from crash_workload import BLOCK, block_content, lost_blocks, ops_for_generation  # noqa: E402,E501

SIZE = 4 << 20
GENS = int(os.environ.get("QCOW2_PL_GENS", "12"))
POINTS = int(os.environ.get("QCOW2_PL_POINTS", "12"))
PEND_LIMIT = os.environ.get("QCOW2_PL_PEND_LIMIT")   # small values force commits mid-op


def make(tmp, variant):
    img = tmp / "c.qcow2"
    if variant == "fresh-v3-64k":
        qemu_img("create", "-f", "qcow2", img, SIZE)
    elif variant == "v2-4k-raw-backing":
        (tmp / "base.raw").write_bytes(bytes(range(7, 256, 3)) * (SIZE // 83) + bytes(SIZE % 83))
        qemu_img("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096",
                 "-b", "base.raw", "-F", "raw", img, SIZE)
    elif variant == "v3-snapshot-compressed":
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16384", img, SIZE)
        qemu_io(img, "write -c -P 0x44 0 1M", "write -P 0x55 1M 1M", "write -z 2M 1M")
        qemu_img("snapshot", "-c", "s", img)
    elif variant == "v3-512-refcount64":
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", img, SIZE)
    return img


@pytest.mark.parametrize("variant", ["fresh-v3-64k", "v2-4k-raw-backing",
                                     "v3-snapshot-compressed", "v3-512-refcount64"])
def test_power_loss_orderings(tmp_path, variant, monkeypatch):
    img = make(tmp_path, variant)
    initial_file = img.read_bytes()
    initial = to_raw(img, tmp_path / "initial.raw")
    log = []            # ("w", off, bytes) | ("s",)
    real_pwrite = engine._pwrite_all

    def logged_pwrite(fd, data, off):
        log.append(("w", off, bytes(data)))
        real_pwrite(fd, data, off)

    monkeypatch.setattr(engine, "_pwrite_all", logged_pwrite)
    seed = sum(map(ord, variant))
    nblocks = SIZE // BLOCK
    flushes = []        # (syncs completed, generation)
    with Qcow2Image.open(img) as q:
        real_sync = q._sync

        def logged_sync():
            real_sync()
            log.append(("s",))

        q._sync = logged_sync
        # half of the variants commit after every 3 pending updates (mid-operation)
        q._pend_limit = int(PEND_LIMIT) if PEND_LIMIT else (3 if seed % 2 else 4096)
        for gen in range(GENS):
            for kind, b, n, i in ops_for_generation(seed, gen, nblocks):
                off = b * BLOCK
                if kind == "write":
                    q.write(off, b"".join(block_content(seed, gen, i, b + k) for k in range(n)))
                elif kind == "discard":
                    q.discard(off, n * BLOCK)
                else:
                    q.write_zeroes(off, n * BLOCK)
            q.flush()
            flushes.append((sum(1 for e in log if e[0] == "s"), gen))
    sync_pos = [i for i, e in enumerate(log) if e[0] == "s"]
    gran = min(BLOCK, q.cluster_size)
    rnd = random.Random(seed)
    points = sorted(rnd.sample(range(len(sync_pos) + 1), min(POINTS, len(sync_pos) + 1)))
    for k in points:
        start = sync_pos[k - 1] + 1 if k else 0
        end = sync_pos[k] if k < len(sync_pos) else len(log)
        f = bytearray(initial_file)

        def apply(e):
            _, off, data = e
            if off + len(data) > len(f):
                f.extend(bytes(off + len(data) - len(f)))
            f[off:off + len(data)] = data

        for e in log[:start]:
            if e[0] == "w":
                apply(e)
        for e in log[start:end]:
            if e[0] == "w" and rnd.random() < 0.5:
                apply(e)
        crashed = tmp_path / "crashed.qcow2"
        crashed.write_bytes(bytes(f))
        rc, out = check_rc(crashed)
        assert rc in (0, 3), f"crash after sync {k}: {out}"
        acked = [g for s, g in flushes if s <= k]
        last = acked[-1] if acked else -1
        model = [initial[b * BLOCK:(b + 1) * BLOCK] for b in range(nblocks)]
        for gen in range(last + 1):
            for kind, b, n, i in ops_for_generation(seed, gen, nblocks):
                for j in range(n):
                    model[b + j] = block_content(seed, gen, i, b + j) if kind == "write" \
                        else bytes(BLOCK)
        maybe = {}
        for gen in range(last + 1, GENS):
            for kind, b, n, i in ops_for_generation(seed, gen, nblocks):
                for j in range(n):
                    maybe.setdefault(b + j, []).append(
                        block_content(seed, gen, i, b + j) if kind == "write" else bytes(BLOCK))
        now = to_raw(crashed, tmp_path / "now.raw")
        bad = lost_blocks(now, model, maybe, nblocks, gran)
        assert not bad, f"crash after sync {k} (acked gen {last}): lost blocks {bad[:5]}"
