"""``ublk-runner qcow2 create/info/check`` against qemu-img, the oracle."""
import json
import os
import subprocess
import sys

import pytest

from qcow2_helpers import ROOT, check_rc, info, qemu_img, qemu_io
from ublk_plugins.qcow2 import Qcow2Image


def cli(*args):
    return subprocess.run([sys.executable, "-m", "runner.cli", "qcow2", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


@pytest.mark.parametrize("compat,cluster", [("1.1", "64K"), ("0.10", "4K"), ("1.1", "2M")])
def test_create_matches_qemu_img(tmp_path, compat, cluster):
    img = tmp_path / "c.qcow2"
    p = cli("create", img, "100M", "--cluster-size", cluster, "--compat", compat)
    assert p.returncode == 0, p.stderr
    i = info(img)
    assert i["virtual-size"] == 100 << 20
    assert i["cluster-size"] == {"64K": 65536, "4K": 4096, "2M": 2 << 20}[cluster]
    assert i["format-specific"]["data"]["compat"] == compat
    assert check_rc(img)[0] == 0
    assert cli("create", img, "1M").returncode == 1          # exists: refused without --force
    assert "exists" in cli("create", img, "1M").stderr
    assert cli("create", img, "1M", "--force").returncode == 0


def test_create_with_backing_and_bad_input(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x07" * (1 << 20))
    top = tmp_path / "top.qcow2"
    assert cli("create", top, "1M", "-b", "base.raw", "-F", "raw").returncode == 0
    i = info(top)
    assert i["backing-filename"] == "base.raw" and i["backing-filename-format"] == "raw"
    assert qemu_img("convert", "-O", "raw", top, tmp_path / "t.raw").returncode == 0
    assert (tmp_path / "t.raw").read_bytes() == base.read_bytes()
    p = cli("create", tmp_path / "x.qcow2", "1.5G")
    assert p.returncode == 1 and "fraction" in p.stderr
    p = cli("create", tmp_path / "y.qcow2", "1G", "--cluster-size", "3K")
    assert p.returncode == 1 and "cluster_size" in p.stderr


def test_info_matches_qemu_img(tmp_path):
    img = tmp_path / "i.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,compression_type=zlib", img, "10M")
    qemu_io(img, "write -P 3 0 64k")
    qemu_img("snapshot", "-c", "snap1", img)
    p = cli("info", img, "--json")
    assert p.returncode == 0, p.stderr
    ours, theirs = json.loads(p.stdout), info(img)
    for k in ("virtual-size", "cluster-size"):
        assert ours[k] == theirs[k]
    assert ours["compat"] == theirs["format-specific"]["data"]["compat"]
    assert [s["name"] for s in ours["snapshots"]] == [s["name"] for s in theirs["snapshots"]]
    p = cli("info", tmp_path / "missing.qcow2")
    assert p.returncode == 1 and "missing.qcow2" in p.stderr


def _agree(img):
    ours = cli("check", img)
    theirs = check_rc(img)
    assert ours.returncode == theirs[0], (ours.stdout, theirs[1])
    return ours


def test_check_clean_images(tmp_path):
    img = tmp_path / "k.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "8M")
    qemu_io(img, "write -P 1 0 1M", "write -z 64k 64k", "write -c -P 2 2M 64k", "discard 512k 128k")
    assert _agree(img).returncode == 0
    qemu_img("snapshot", "-c", "s", img)                   # shared clusters, COPIED cleared
    qemu_io(img, "write -P 9 0 16k")                       # COW after the snapshot
    assert _agree(img).returncode == 0
    v2 = tmp_path / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "4M")
    qemu_io(v2, "write -P 5 0 300k")
    assert _agree(v2).returncode == 0


def test_check_finds_a_leak(tmp_path):
    img = tmp_path / "l.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "8M")
    qemu_io(img, "write -P 1 0 128k")
    with Qcow2Image.open(img) as q:
        with q._lock:
            q._prepare_write()
            off = q._alloc(1)                                # refcount 1, nothing points at it
            q._write(bytes(q.cluster_size), off)            # (and inside the file: qemu only scans that)
            q._sync()
    p = _agree(img)
    assert p.returncode == 3 and "1 leaked clusters" in p.stdout
    data = json.loads(cli("check", img, "--json").stdout)
    assert data["leaks"] == 1 and data["corruptions"] == 0


@pytest.mark.parametrize("refcount", [0, 2])
def test_check_finds_corruption(tmp_path, refcount):
    img = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "8M")
    qemu_io(img, "write -P 1 0 128k")
    with Qcow2Image.open(img) as q:
        host = q.map_range(0, 4096)[0][3]
        with q._lock:
            q._prepare_write()
            q._set_refcount(host >> q.cluster_bits, refcount)   # 0: referenced but free; 2: COPIED lies
            q._sync()
    p = _agree(img)
    assert p.returncode == 2
    assert "ERROR" in p.stdout


def test_check_of_a_damaged_file_fails_cleanly(tmp_path):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"not a qcow2 image" * 100)
    p = cli("check", bad)
    assert p.returncode == 1 and "cannot check" in p.stderr
    assert os.path.exists(bad)
