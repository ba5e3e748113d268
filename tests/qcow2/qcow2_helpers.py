"""Helpers for the qcow2 tests (a uniquely named module, so it cannot clash with
other conftest.py files): makes `ublk_plugins` importable from a source checkout and
wraps the qemu-img / qemu-io oracles."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

try:
    import ublk_plugins.qcow2  # noqa: F401
except ImportError:
    for k in [k for k in sys.modules if k == "ublk_plugins" or k.startswith("ublk_plugins.")]:
        del sys.modules[k]
    spec = importlib.util.spec_from_file_location(
        "ublk_plugins", ROOT / "plugins" / "__init__.py",
        submodule_search_locations=[str(ROOT / "plugins")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ublk_plugins"] = mod
    spec.loader.exec_module(mod)

HAVE_QEMU = bool(shutil.which("qemu-img") and shutil.which("qemu-io"))


def run(*args, check=True, cwd=None):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p


def qemu_img(*args, **kw):
    return run("qemu-img", *args, **kw)


def qemu_io(img, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    p = run(*args, img)
    if "error" in p.stdout.lower() or "failed" in p.stdout.lower():
        raise AssertionError(p.stdout)
    return p


def to_raw(img, out, snapshot=None, force_share=False):
    args = ["convert", "-O", "raw"] + (["-U"] if force_share else [])
    if snapshot is not None:
        args += ["-l", f"snapshot.name={snapshot}"]
    qemu_img(*args, img, out)
    return Path(out).read_bytes()


def check_rc(img):
    p = qemu_img("check", img, check=False)
    return p.returncode, p.stdout + p.stderr


def compare_raw(img, raw):
    p = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, raw, check=False)
    return p.returncode, p.stdout + p.stderr


def info(img):
    return json.loads(qemu_img("info", "--output=json", img).stdout)


#: images the crash and power-loss tests write to: fresh v3, v2 over a raw backing file,
#: v3 with an internal snapshot and compressed/zero clusters, 512-byte clusters with
#: 64-bit refcounts
CRASH_VARIANTS = ["fresh-v3-64k", "v2-4k-raw-backing", "v3-snapshot-compressed", "v3-512-refcount64"]


def make_variant(tmp, variant, size):
    """``tmp/c.qcow2`` of ``size`` bytes, made by qemu-img/qemu-io as ``variant`` says."""
    img = tmp / "c.qcow2"
    if variant == "fresh-v3-64k":
        qemu_img("create", "-f", "qcow2", img, size)
    elif variant == "v2-4k-raw-backing":
        (tmp / "base.raw").write_bytes(bytes(range(13, 256, 2)) * (size // 122) + bytes(size % 122))
        qemu_img("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096",
                 "-b", "base.raw", "-F", "raw", img, size)
    elif variant == "v3-snapshot-compressed":
        e = size // 8
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16384", img, size)
        qemu_io(img, f"write -c -P 0x44 0 {e}", f"write -P 0x55 {e} {2 * e}", f"write -z {3 * e} {e}")
        qemu_img("snapshot", "-c", "s", img)
    elif variant == "v3-512-refcount64":
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", img, size)
    else:
        raise ValueError(variant)
    return img
