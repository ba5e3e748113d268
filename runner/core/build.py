"""cffi build script for the native core (out-of-line API mode).

The cdef below is the Python-visible part of ``uring.h`` and ``ublk_abi.h``; values come from
the compiler (``...``), so the header stays the one source of truth for the ABI.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
struct ubc;
struct ubq;

struct ublksrv_ctrl_dev_info {
    uint16_t nr_hw_queues;
    uint16_t queue_depth;
    uint16_t state;
    uint32_t max_io_buf_bytes;
    uint32_t dev_id;
    int32_t ublksrv_pid;
    uint64_t flags;
    uint64_t ublksrv_flags;
    uint32_t owner_uid;
    uint32_t owner_gid;
    ...;
};
struct ublk_param_basic {
    uint32_t attrs;
    uint8_t logical_bs_shift;
    uint8_t physical_bs_shift;
    uint8_t io_opt_shift;
    uint8_t io_min_shift;
    uint32_t max_sectors;
    uint32_t chunk_sectors;
    uint64_t dev_sectors;
    uint64_t virt_boundary_mask;
};
struct ublk_param_discard {
    uint32_t discard_alignment;
    uint32_t discard_granularity;
    uint32_t max_discard_sectors;
    uint32_t max_write_zeroes_sectors;
    uint16_t max_discard_segments;
    ...;
};
struct ublk_param_devt {
    uint32_t char_major;
    uint32_t char_minor;
    uint32_t disk_major;
    uint32_t disk_minor;
};
struct ublk_params {
    uint32_t len;
    uint32_t types;
    struct ublk_param_basic basic;
    struct ublk_param_discard discard;
    struct ublk_param_devt devt;
    ...;
};

struct ubq_req {
    uint64_t offset;
    uint32_t length;
    uint32_t op_flags;
    uint16_t tag;
    ...;
};
#define UBQ_NR_OPS ...
#define UBQ_LAT_BUCKETS ...
#define UBQ_NATIVE_NONE ...
#define UBQ_NATIVE_NULL ...
#define UBQ_NATIVE_FILE ...
struct ubq_stats {
    uint64_t ops[...];
    uint64_t bytes[...];
    uint64_t errors;
    uint64_t in_flight;
    uint64_t bad_completions;
    uint64_t kernel_errors;
    int32_t last_kernel_error;
    uint32_t aborted;
    uint64_t lat_us[...];
    uint64_t forwarded;
    uint64_t forward_errors;
    uint64_t signals;
    uint64_t waits;
    uint64_t batches;
};
#define UBQ_REQ_FORWARDED ...

#define UBLK_U_CMD_GET_QUEUE_AFFINITY ...
#define UBLK_U_CMD_GET_DEV_INFO ...
#define UBLK_U_CMD_ADD_DEV ...
#define UBLK_U_CMD_DEL_DEV ...
#define UBLK_U_CMD_START_DEV ...
#define UBLK_U_CMD_STOP_DEV ...
#define UBLK_U_CMD_SET_PARAMS ...
#define UBLK_U_CMD_GET_PARAMS ...
#define UBLK_U_CMD_START_USER_RECOVERY ...
#define UBLK_U_CMD_END_USER_RECOVERY ...
#define UBLK_U_CMD_GET_DEV_INFO2 ...
#define UBLK_U_CMD_GET_FEATURES ...
#define UBLK_U_CMD_DEL_DEV_ASYNC ...

int ubc_open(struct ubc **out);
void ubc_close(struct ubc *c);
int ubc_event_fd(struct ubc *c);
int ubc_submit(struct ubc *c, uint32_t cmd_op, uint32_t dev_id, uint16_t q_id,
               const void *buf, uint32_t len, uint64_t data0);
int ubc_reap(struct ubc *c, int timeout_ms, void *buf_out, uint32_t len);
int ubc_cmd(struct ubc *c, uint32_t cmd_op, uint32_t dev_id, uint16_t q_id,
            void *buf, uint32_t len, uint64_t data0, int timeout_ms);

int ubq_open(struct ubq **out, int cdev_fd, uint16_t q_id, uint16_t depth,
             uint32_t max_io_bytes, uint64_t dev_flags, int pollable);
void ubq_close(struct ubq *q);
int ubq_fetch_all(struct ubq *q);
int ubq_set_native(struct ubq *q, int kind);
int ubq_set_native_null(struct ubq *q, uint32_t latency_us, uint32_t error_ops, int32_t error);
int ubq_set_native_file(struct ubq *q, int fd);
int ubq_run(struct ubq *q, const uint16_t *tags, const int32_t *results, uint32_t n_done,
            struct ubq_req *out, uint32_t max_out, int timeout_ms);
int ubq_complete(struct ubq *q, uint16_t tag, int32_t result);
int ubq_set_forward_fd(struct ubq *q, int fd);
int ubq_forward(struct ubq *q, const uint16_t *tags, const uint64_t *host_offs, uint32_t n);
int ubq_poll_fd(struct ubq *q);
ssize_t ubq_copy_from_req(struct ubq *q, uint16_t tag, void *dst, size_t len, size_t off);
ssize_t ubq_copy_to_req(struct ubq *q, uint16_t tag, const void *src, size_t len, size_t off);
void *ubq_tag_buffer(struct ubq *q, uint16_t tag);
int ubq_user_copy(struct ubq *q);
void ubq_get_stats(struct ubq *q, struct ubq_stats *out);
int ub_set_io_flusher(void);
int ub_fallocate(int fd, int mode, uint64_t offset, uint64_t length);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "runner.core._uring",
    '#include "uring.h"\n#include "ublk_abi.h"\n',
    sources=[os.path.relpath(os.path.join(HERE, "uring.c"))],
    include_dirs=[os.path.relpath(HERE)],
    libraries=["uring"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
