"""Consistency check of a qcow2 image, in the spirit of ``qemu-img check`` (which stays the oracle).

Every host cluster's expected reference count is rebuilt from the metadata (header, L1 and
refcount tables, refcount blocks, snapshot table and snapshot L1s, L2 tables, data and compressed
clusters) and compared with the stored refcounts:

- stored < referenced, a COPIED flag that disagrees with "refcount == 1", a misaligned or
  out-of-file table offset: **corruption** (exit 2);
- stored > referenced: a **leak** (exit 3; harmless, the space is just not reused);
- otherwise clean (exit 0). An image that cannot be opened or read: exit 1.
"""
from __future__ import annotations

import os
import struct
from collections import Counter

from .engine import COMPRESSED, COPIED, OFFSET_MASK, Qcow2Image, _be_array

EXIT_CLEAN, EXIT_FAILED, EXIT_CORRUPT, EXIT_LEAKS = 0, 1, 2, 3


def check(path: str) -> dict:
    """-> {"corruptions": n, "leaks": n, "errors": [messages], "leak_clusters": [...],
    "image_end_offset": bytes, "allocated_clusters": n}. Opens the image read-only."""
    with Qcow2Image.open(path, readonly=True, cache_bytes=1 << 20) as q:
        return _check(q)


def exit_code(result: dict) -> int:
    if result["corruptions"]:
        return EXIT_CORRUPT
    if result["leaks"]:
        return EXIT_LEAKS
    return EXIT_CLEAN


def _check(q: Qcow2Image) -> dict:
    cs = q.cluster_size
    cb = q.cluster_bits
    fd = q.fileno()
    file_end = os.fstat(fd).st_size
    refs: Counter = Counter()
    errors: list[str] = []
    copied_errors = 0

    def ref_range(off, length, what):
        if off & (cs - 1):
            errors.append(f"{what} at 0x{off:x} is not cluster aligned")
            return False
        for c in range(off >> cb, (off + max(length, 1) - 1 >> cb) + 1):
            refs[c] += 1
        return True

    ref_range(0, cs, "header")
    ref_range(q._rt_off, q._rt_clusters * cs, "refcount table")
    for t, e in enumerate(q._rt):
        boff = e & ~(cs - 1)
        if e & (cs - 1):
            errors.append(f"refcount block {t} at 0x{e:x} is not cluster aligned")
        elif boff:
            ref_range(boff, cs, f"refcount block {t}")

    def walk_l1(l1_off, l1_size, active):
        nonlocal copied_errors
        if not l1_size:
            return
        ref_range(l1_off, l1_size * 8, "L1 table")
        l1 = _be_array(os.pread(fd, l1_size * 8, l1_off))
        for i1, l1e in enumerate(l1):
            l2off = l1e & OFFSET_MASK
            if not l2off:
                continue
            if not ref_range(l2off, cs, f"L2 table (L1 index {i1})"):
                continue
            if l2off + cs > file_end:
                errors.append(f"L2 table at 0x{l2off:x} lies past the end of the file")
                continue
            if active:
                want_copied.append(("L1", i1, l2off >> cb, bool(l1e & COPIED)))
            tbl = os.pread(fd, cs, l2off)
            step = 16 if q._ext_l2 else 8
            for i2 in range(0, cs, step):
                e = struct.unpack_from(">Q", tbl, i2)[0]
                if not e:
                    continue
                if e & COMPRESSED:
                    for c in q._compressed_clusters(e):
                        refs[c >> cb] += 1
                    if active and e & COPIED:
                        errors.append(f"compressed cluster (L2 0x{l2off:x} entry {i2 // step}) has COPIED set")
                        copied_errors += 1
                    continue
                off = e & OFFSET_MASK
                if not off:
                    continue
                if not ref_range(off, cs, f"data cluster (L2 0x{l2off:x} entry {i2 // step})"):
                    continue
                if active:
                    want_copied.append(("L2", (l2off, i2 // step), off >> cb, bool(e & COPIED)))

    want_copied: list = []
    walk_l1(q._l1_off, len(q._l1), True)
    snap_table = getattr(q, "_snap_table", None)
    if snap_table:
        ref_range(snap_table[0], snap_table[1], "snapshot table")
    for sid, (s_off, s_size) in q._snap_l1.items():
        walk_l1(s_off, s_size, False)

    corruptions = leaks = 0
    leak_clusters = []
    last = max(list(refs) + [(file_end - 1) >> cb] + [0])
    n_rc = len(q._rt) * q._rc_epb
    for c in range(0, max(last + 1, 0)):
        stored = q._refcount(c) if c < n_rc else 0
        want = refs.get(c, 0)
        if stored < want:
            corruptions += 1
            errors.append(f"cluster {c} (0x{c << cb:x}): refcount={stored} reference={want}")
        elif stored > want:
            leaks += 1
            leak_clusters.append(c)
    for kind, where, c, has in want_copied:
        rc = q._refcount(c) if c < n_rc else 0
        if has != (rc == 1):
            copied_errors += 1
            errors.append(f"OFLAG_COPIED {kind} {where}: refcount={rc}, COPIED={'set' if has else 'clear'}")
    corruptions += copied_errors + sum(1 for m in errors if "aligned" in m or "past the end" in m)
    return {"corruptions": corruptions, "leaks": leaks, "errors": errors,
            "leak_clusters": leak_clusters, "allocated_clusters": len(refs),
            "image_end_offset": file_end}
