"""Fixtures for tests against a real, throw-away Ceph cluster (see cluster.py, README.md).

``ceph_cluster`` (session): one monitor + one memstore OSD on 127.0.0.1, pool ``rbd``.
Skips only when the Ceph programs or Debian's Python bindings are not installed.
Set UBLK_CEPH_KEEP=1 to keep the cluster directory (logs) after the session.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _load_cluster_module():
    # Loaded under a distinctive name: a top-level "cluster" module could clash with
    # other test directories.
    name = "ublk_tests_ceph_cluster"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "cluster.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


ceph_cluster_mod = _load_cluster_module()


def _ensure_ublk_plugins() -> None:
    """Make ``ublk_plugins`` importable from a source checkout (setuptools maps it to
    plugins/ only when the project is installed)."""
    try:
        import ublk_plugins  # noqa: F401
        return
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location(
        "ublk_plugins", os.path.join(ROOT, "plugins", "__init__.py"),
        submodule_search_locations=[os.path.join(ROOT, "plugins")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ublk_plugins"] = mod
    spec.loader.exec_module(mod)


_ensure_ublk_plugins()


def _require_ceph() -> None:
    missing = ceph_cluster_mod.missing_binaries()
    if missing:
        pytest.skip("Ceph is not installed (missing: " + ", ".join(missing) +
                    "); apt-get install the packages in scripts/ceph-packages.txt and run "
                    "with /usr/bin/python3 or a --system-site-packages venv")


def _make_cluster(objectstore: str, store_bytes: int):
    _require_ceph()
    d = tempfile.mkdtemp(prefix=f"ceph-{objectstore[:4]}-", dir="/tmp")
    c = ceph_cluster_mod.Cluster(d, objectstore=objectstore, store_bytes=store_bytes)
    try:
        c.up(timeout=90)
    except BaseException:
        c.down()  # up() already killed its daemons; keep the directory for its logs
        raise
    return c


def _destroy(c) -> None:
    c.down(purge=not os.environ.get("UBLK_CEPH_KEEP"))


@pytest.fixture(scope="session")
def ceph_cluster():
    c = _make_cluster("memstore", 2 << 30)
    try:
        yield c
    finally:
        _destroy(c)


@pytest.fixture(scope="module")
def bluestore_cluster():
    """A separate cluster whose OSD keeps its data across SIGKILL (crash) + restart."""
    c = _make_cluster("bluestore", 4 << 30)
    try:
        yield c
    finally:
        _destroy(c)


class ImageFactory:
    def __init__(self, cluster):
        self.cluster = cluster
        self.names: list[str] = []

    def __call__(self, size: int = 64 << 20) -> str:
        name = "t-" + uuid.uuid4().hex[:10]
        self.cluster.create_image(name, size)
        self.names.append(name)
        return name

    def open(self, name: str, **kw):
        from ublk_plugins.rbd.backend import RbdBackend
        i = self.cluster.info()
        args = dict(conf=i["conf"], client=i["client"], keyring=i["keyring"])
        args.update(kw)
        return RbdBackend.open(i["pool"], name, **args)

    def cleanup(self) -> None:
        import rbd
        if not self.cluster.pids.get("osd.0"):
            return
        try:
            r = self.cluster.rados(timeout=10)
        except Exception:
            return
        try:
            ioctx = r.open_ioctx(self.cluster.pool)
            for n in self.names:
                try:
                    img = rbd.Image(ioctx, n)
                    for s in list(img.list_snaps()):
                        img.remove_snap(s["name"])
                    img.close()
                    rbd.RBD().remove(ioctx, n)
                except Exception:
                    pass
            ioctx.close()
        finally:
            r.shutdown()


@pytest.fixture
def rbd_image(ceph_cluster):
    """Factory: rbd_image(size) -> new image name; rbd_image.open(name, **kw) -> RbdBackend."""
    f = ImageFactory(ceph_cluster)
    yield f
    f.cleanup()


@pytest.fixture
def bluestore_rbd_image(bluestore_cluster):
    f = ImageFactory(bluestore_cluster)
    yield f
    f.cleanup()
