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

from qcow2_helpers import CRASH_VARIANTS, check_rc, make_variant, to_raw
from ublk_plugins.qcow2 import engine
from ublk_plugins.qcow2 import Qcow2Image

sys.path.insert(0, str(Path(__file__).parent))
from crash_workload import BLOCK, apply_generation, expected_after, lost_blocks  # noqa: E402

SIZE = 4 << 20
GENS = int(os.environ.get("QCOW2_PL_GENS", "12"))
POINTS = int(os.environ.get("QCOW2_PL_POINTS", "12"))
PEND_LIMIT = os.environ.get("QCOW2_PL_PEND_LIMIT")   # small values force commits mid-op


@pytest.mark.parametrize("variant", CRASH_VARIANTS)
def test_power_loss_orderings(tmp_path, variant, monkeypatch):
    img = make_variant(tmp_path, variant, SIZE)
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
            apply_generation(q, seed, gen, nblocks)
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
        model, maybe = expected_after(initial, seed, last, range(last + 1, GENS), nblocks)
        now = to_raw(crashed, tmp_path / "now.raw")
        bad = lost_blocks(now, model, maybe, nblocks, gran)
        assert not bad, f"crash after sync {k} (acked gen {last}): lost blocks {bad[:5]}"
