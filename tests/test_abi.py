"""The kernel ABI as the native core sees it (host test: no kernel needed)."""
from runner.core import ffi, lib


def test_struct_sizes_match_the_6_12_uapi():
    assert ffi.sizeof("struct ublksrv_ctrl_dev_info") == 64
    assert ffi.sizeof("struct ublk_params") == 112
    assert ffi.sizeof("struct ublk_param_basic") == 32
    assert ffi.sizeof("struct ublk_param_discard") == 20
    assert ffi.sizeof("struct ubq_req") == 24
    assert ffi.offsetof("struct ublk_params", "discard") == 40
    assert ffi.offsetof("struct ublk_params", "devt") == 60


def test_command_encodings():
    assert lib.UBLK_U_CMD_GET_FEATURES == 0x80207513
    assert lib.UBLK_U_CMD_ADD_DEV == 0xC0207504
    assert lib.UBLK_U_CMD_GET_DEV_INFO == 0x80207502
    assert lib.UBLK_U_CMD_DEL_DEV_ASYNC == 0x80207514
    assert lib.UBLK_U_CMD_END_USER_RECOVERY == 0xC0207511


def test_params_roundtrip_through_c():
    from runner.ublk import Params
    p = Params(size=1 << 30, logical_block_size=4096, volatile_cache=True, fua=True,
               discard_granularity=4096, max_discard_bytes=1 << 20, max_write_zeroes_bytes=1 << 20)
    c = p.to_c(1 << 20)
    assert c.basic.max_sectors == 2048 and c.basic.logical_bs_shift == 12 and c.types == 3
    back = Params.from_c(c)
    assert (back.size, back.logical_block_size, back.volatile_cache, back.max_discard_bytes) == \
        (1 << 30, 4096, True, 1 << 20)
