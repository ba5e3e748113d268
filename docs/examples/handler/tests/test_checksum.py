"""Unit tests of the checksum-mem handler through the handler API: no kernel, no root.

    python -m pytest docs/examples/handler/tests
"""
import errno

import pytest

from runner.handler import DeviceSpec, check_instance, validate_options
from ublk_example_checksum import ChecksumMem


def open_device(size=64 * 1024, **raw_options):
    spec = DeviceSpec("t0", size=size)
    options, errors = validate_options(ChecksumMem.options_schema, raw_options, ChecksumMem.name)
    assert errors == []
    ChecksumMem.check_config(options, spec)
    h = ChecksumMem.open(options, spec)
    return h, check_instance(h, spec)   # what the runner checks right after open()


def test_capabilities():
    _, caps = open_device()
    assert caps["can_write"] and caps["can_discard"] and caps["can_write_zeroes"]
    assert not caps["can_flush"] and not caps["can_fua"]


def test_write_then_read_back():
    h, _ = open_device(fill=0x55)
    h.write(4096, memoryview(b"\xaa" * 1024), False)
    buf = bytearray(8192)
    h.read(0, memoryview(buf))
    assert buf[:4096] == b"\x55" * 4096
    assert buf[4096:5120] == b"\xaa" * 1024
    assert buf[5120:] == b"\x55" * 3072


def test_corruption_fails_the_read_with_eio():
    h, _ = open_device()
    h.data[5000] ^= 1                       # a bit flips behind the handler's back
    h.read(0, memoryview(bytearray(4096)))  # chunk 0 is fine
    with pytest.raises(OSError) as e:
        h.read(4096, memoryview(bytearray(512)))
    assert e.value.errno == errno.EIO


def test_write_zeroes_spanning_chunks():
    h, _ = open_device(fill=1)
    h.write_zeroes(2048, 3 * 4096, False)
    buf = bytearray(5 * 4096)
    h.read(0, memoryview(buf))
    assert buf == b"\x01" * 2048 + bytes(3 * 4096) + b"\x01" * (2 * 4096 - 2048)


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of block_size"):
        ChecksumMem.check_config({"chunk": 1000, "fill": 0, "verify": True}, DeviceSpec("t", size=1 << 20))
    _, errors = validate_options(ChecksumMem.options_schema, {"chunk": "2M"})
    assert errors == [(("chunk",), "2M is out of range (expected 512..1M)")]
