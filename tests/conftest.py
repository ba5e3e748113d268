import os

import pytest

HAVE_UBLK = os.path.exists("/dev/ublk-control")


def pytest_collection_modifyitems(config, items):
    if HAVE_UBLK:
        return
    skip = pytest.mark.skip(reason="needs /dev/ublk-control: run through tests/vm/run (see README)")
    for item in items:
        if "device" in item.keywords:
            item.add_marker(skip)
