import os

import pytest

HAVE_UBLK = os.path.exists("/dev/ublk-control")


def pytest_collection_modifyitems(config, items):
    if HAVE_UBLK:
        return
    if os.environ.get("UBLK_REQUIRE_DEVICE") == "1" and any("device" in i.keywords for i in items):
        raise pytest.UsageError("UBLK_REQUIRE_DEVICE=1 but /dev/ublk-control is missing: "
                                "device tests would be skipped")
    skip = pytest.mark.skip(reason="needs /dev/ublk-control: run through tests/vm/run (see README)")
    for item in items:
        if "device" in item.keywords:
            item.add_marker(skip)
