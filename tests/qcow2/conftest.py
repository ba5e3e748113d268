import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qcow2_helpers  # noqa: E402  (also makes ublk_plugins importable from source)


def pytest_collection_modifyitems(config, items):
    if qcow2_helpers.HAVE_QEMU:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason="qemu-img/qemu-io (qemu-utils) not installed")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)
