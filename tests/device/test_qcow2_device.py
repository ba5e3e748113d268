import hashlib
import os
import shutil
import subprocess

import pytest

from .runnerproc import REPO, sh
from .test_io import run_fio

pytestmark = [pytest.mark.device,
              pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img (qemu-utils) missing")]


def qcow2_device(name, path, queues=1):
    return f"""
devices:
  - name: {name}
    handler: qcow2
    queues: {queues}
    options:
      path: {path}
"""


def sha_of(path, size):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(left, 1 << 20))
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def test_ext4_on_qcow2_then_qemu_img_agrees(runner, tmp_path):
    img = tmp_path / "disk.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(img), "128M")
    r = runner(qcow2_device("q", img))
    dev = r.devices()["q"]["block"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mkfs.ext4", "-q", dev)
    sh("mount", dev, str(mnt))
    try:
        shutil.copytree(os.path.join(REPO, "runner"), mnt / "tree", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    finally:
        sh("umount", str(mnt))
    assert sh("fsck.ext4", "-f", "-n", dev).returncode == 0
    through_device = sha_of(dev, 128 << 20)
    assert r.stop() == 0
    check = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = tmp_path / "disk.raw"
    sh("qemu-img", "convert", "-O", "raw", str(img), str(raw))
    assert sha_of(raw, 128 << 20) == through_device


def test_fio_verify_on_qcow2_with_2_queues(runner, tmp_path, fio):
    img = tmp_path / "f.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M")
    r = runner(qcow2_device("q", img, queues=2))
    run_fio(fio, r.devices()["q"]["block"])
    assert r.stop() == 0
    check = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
