"""Crash-test workload: random writes/discards/zeroes in generations; after each
generation's flush, prints the generation number. Run as:
    python3 crash_workload.py PLUGINS_DIR IMAGE SEED
The op stream is a pure function of SEED (see ops_for_generation), so the test
can replay it to know what every acknowledged generation wrote.
"""
import importlib.util
import random
import struct
import sys

BLOCK = 4096


def ops_for_generation(seed, gen, nblocks):
    rnd = random.Random(seed * 1000003 + gen)
    ops = []
    for i in range(rnd.randint(1, 12)):
        r = rnd.random()
        b = rnd.randrange(nblocks - 4)
        n = rnd.randint(1, 4)
        kind = "write" if r < 0.7 else ("discard" if r < 0.85 else "zero")
        ops.append((kind, b, n, i))
    return ops


def block_content(seed, gen, i, b):
    return struct.pack(">IIII", seed, gen, i, b) * (BLOCK // 16)


def _block_results(seed, gen, nblocks):
    """(block, content it holds after the op) for every block generation ``gen`` touches."""
    for kind, b, n, i in ops_for_generation(seed, gen, nblocks):
        for k in range(n):
            yield b + k, block_content(seed, gen, i, b + k) if kind == "write" else bytes(BLOCK)


def expected_after(initial, seed, acked, pending, nblocks):
    """What the image must hold once generations ``0..acked`` were acknowledged by a flush:
    ``model[b]`` (block b's acknowledged content) and ``maybe[b]`` (contents the generations in
    ``pending``, never acknowledged, may also have left there)."""
    model = [initial[b * BLOCK:(b + 1) * BLOCK] for b in range(nblocks)]
    for gen in range(acked + 1):
        for b, data in _block_results(seed, gen, nblocks):
            model[b] = data
    maybe = {}
    for gen in pending:
        for b, data in _block_results(seed, gen, nblocks):
            maybe.setdefault(b, []).append(data)
    return model, maybe


def apply_generation(q, seed, gen, nblocks):
    """Do generation ``gen``'s operations on the open image ``q`` (no flush)."""
    for kind, b, n, i in ops_for_generation(seed, gen, nblocks):
        off = b * BLOCK
        if kind == "write":
            q.write(off, b"".join(block_content(seed, gen, i, b + k) for k in range(n)))
        elif kind == "discard":
            q.discard(off, n * BLOCK)
        else:
            q.write_zeroes(off, n * BLOCK)


def main():
    plugins, img, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    spec = importlib.util.spec_from_file_location(
        "ublk_plugins", plugins + "/__init__.py", submodule_search_locations=[plugins])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ublk_plugins"] = mod
    spec.loader.exec_module(mod)
    from ublk_plugins.qcow2 import Qcow2Image
    q = Qcow2Image.open(img)
    nblocks = q.size // BLOCK
    gen = 0
    while True:
        apply_generation(q, seed, gen, nblocks)
        q.flush()
        print(gen, flush=True)
        gen += 1


if __name__ == "__main__":
    main()


def lost_blocks(now, model, maybe, nblocks, gran=BLOCK):
    """Blocks whose content is neither the acknowledged one nor from a later write.

    A later (unacknowledged) write that spans several clusters may be torn at cluster
    boundaries, so each `gran`-sized piece (gran = min(BLOCK, cluster size)) is checked
    on its own.
    """
    bad = []
    for b in range(nblocks):
        cur = now[b * BLOCK:(b + 1) * BLOCK]
        if cur == model[b] or cur in maybe.get(b, []):
            continue
        for p in range(0, BLOCK, gran):
            piece = cur[p:p + gran]
            if piece != model[b][p:p + gran] and \
                    all(piece != m[p:p + gran] for m in maybe.get(b, [])):
                bad.append(b)
                break
    return bad
