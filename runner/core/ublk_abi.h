/*
 * The ublk kernel ABI as ublk-runner uses it, written for this project from the 6.12 UAPI facts
 * (see docs/reference/kernel.rst).  We never include the system <linux/ublk_cmd.h>: Debian 12 ships
 * the 6.1 version, which lacks the ioctl encodings, GET_FEATURES and USER_COPY.
 *
 * Newer flags and commands are declared so the code can name them, but they are only used after
 * GET_FEATURES (or the flags ADD_DEV writes back) says the running kernel has them.
 */
#ifndef UBLK_RUNNER_ABI_H
#define UBLK_RUNNER_ABI_H

#include <stddef.h>
#include <stdint.h>
#include <linux/ioctl.h>

/* Control commands travel in a 32-byte payload (sqe->cmd of an SQE128 ring). */
#define UBLK_CTRL_OP(dir, nr) _IOC(dir, 'u', nr, 32)
#define UBLK_IO_OP(nr)        _IOC(_IOC_READ | _IOC_WRITE, 'u', nr, 16)

#define UBLK_U_CMD_GET_QUEUE_AFFINITY  UBLK_CTRL_OP(_IOC_READ, 0x01)
#define UBLK_U_CMD_GET_DEV_INFO        UBLK_CTRL_OP(_IOC_READ, 0x02)
#define UBLK_U_CMD_ADD_DEV             UBLK_CTRL_OP(_IOC_READ | _IOC_WRITE, 0x04)
#define UBLK_U_CMD_DEL_DEV             UBLK_CTRL_OP(_IOC_READ | _IOC_WRITE, 0x05)
#define UBLK_U_CMD_START_DEV           UBLK_CTRL_OP(_IOC_READ | _IOC_WRITE, 0x06)
#define UBLK_U_CMD_STOP_DEV            UBLK_CTRL_OP(_IOC_READ | _IOC_WRITE, 0x07)
#define UBLK_U_CMD_SET_PARAMS          UBLK_CTRL_OP(_IOC_READ | _IOC_WRITE, 0x08)
#define UBLK_U_CMD_GET_PARAMS          UBLK_CTRL_OP(_IOC_READ, 0x09)
#define UBLK_U_CMD_START_USER_RECOVERY UBLK_CTRL_OP(_IOC_READ | _IOC_WRITE, 0x10)
#define UBLK_U_CMD_END_USER_RECOVERY   UBLK_CTRL_OP(_IOC_READ | _IOC_WRITE, 0x11)
#define UBLK_U_CMD_GET_DEV_INFO2       UBLK_CTRL_OP(_IOC_READ, 0x12)
/* GET_FEATURES is matched against the whole u32 by the kernel: the _IOR encoding is mandatory. */
#define UBLK_U_CMD_GET_FEATURES        UBLK_CTRL_OP(_IOC_READ, 0x13)
#define UBLK_U_CMD_DEL_DEV_ASYNC       UBLK_CTRL_OP(_IOC_READ, 0x14)
#define UBLK_U_CMD_UPDATE_SIZE         UBLK_CTRL_OP(_IOC_READ | _IOC_WRITE, 0x15) /* 6.16 */
#define UBLK_U_CMD_QUIESCE_DEV         UBLK_CTRL_OP(_IOC_READ | _IOC_WRITE, 0x16) /* 6.16 */

#define UBLK_U_IO_FETCH_REQ            UBLK_IO_OP(0x20)
#define UBLK_U_IO_COMMIT_AND_FETCH_REQ UBLK_IO_OP(0x21)
#define UBLK_U_IO_NEED_GET_DATA        UBLK_IO_OP(0x22)

/* Result of an IO command's CQE. */
#define UBLK_IO_RES_OK            0
#define UBLK_IO_RES_NEED_GET_DATA 1
#define UBLK_IO_RES_ABORT         (-19) /* -ENODEV: the queue is going away */

/* Feature flags: ublksrv_ctrl_dev_info.flags and GET_FEATURES. */
#define UBLK_F_SUPPORT_ZERO_COPY      (1ULL << 0)
#define UBLK_F_URING_CMD_COMP_IN_TASK (1ULL << 1)
#define UBLK_F_NEED_GET_DATA          (1ULL << 2)
#define UBLK_F_USER_RECOVERY          (1ULL << 3)
#define UBLK_F_USER_RECOVERY_REISSUE  (1ULL << 4)
#define UBLK_F_UNPRIVILEGED_DEV       (1ULL << 5)
#define UBLK_F_CMD_IOCTL_ENCODE       (1ULL << 6)
#define UBLK_F_USER_COPY              (1ULL << 7)
#define UBLK_F_ZONED                  (1ULL << 8)
#define UBLK_F_USER_RECOVERY_FAIL_IO  (1ULL << 9)  /* 6.13 */
#define UBLK_F_UPDATE_SIZE            (1ULL << 10) /* 6.16 */
#define UBLK_F_AUTO_BUF_REG           (1ULL << 11) /* 6.16 */
#define UBLK_F_QUIESCE                (1ULL << 12) /* 6.16 */
#define UBLK_F_PER_IO_DAEMON          (1ULL << 13) /* 6.16 */

/* Device states. */
#define UBLK_S_DEV_DEAD     0
#define UBLK_S_DEV_LIVE     1
#define UBLK_S_DEV_QUIESCED 2
#define UBLK_S_DEV_FAIL_IO  3 /* 6.13 */

/* Request ops (low 8 bits of op_flags) and flags (the rest). */
#define UBLK_IO_OP_READ         0
#define UBLK_IO_OP_WRITE        1
#define UBLK_IO_OP_FLUSH        2
#define UBLK_IO_OP_DISCARD      3
#define UBLK_IO_OP_WRITE_SAME   4
#define UBLK_IO_OP_WRITE_ZEROES 5
#define UBLK_IO_F_FAILFAST_DEV       (1U << 8)
#define UBLK_IO_F_FAILFAST_TRANSPORT (1U << 9)
#define UBLK_IO_F_FAILFAST_DRIVER    (1U << 10)
#define UBLK_IO_F_META               (1U << 11)
#define UBLK_IO_F_FUA                (1U << 13)
#define UBLK_IO_F_NOUNMAP            (1U << 15)
#define UBLK_IO_F_SWAP               (1U << 16)

/* Parameter blocks and attributes. */
#define UBLK_PARAM_TYPE_BASIC   (1U << 0)
#define UBLK_PARAM_TYPE_DISCARD (1U << 1)
#define UBLK_PARAM_TYPE_DEVT    (1U << 2)
#define UBLK_PARAM_TYPE_ZONED   (1U << 3)
#define UBLK_ATTR_READ_ONLY      (1U << 0)
#define UBLK_ATTR_ROTATIONAL     (1U << 1)
#define UBLK_ATTR_VOLATILE_CACHE (1U << 2)
#define UBLK_ATTR_FUA            (1U << 3)

/* Descriptor mmap and user-copy addressing. */
#define UBLK_MAX_QUEUE_DEPTH     4096
#define UBLK_MAX_NR_QUEUES       4096
#define UBLKSRV_CMD_BUF_OFFSET   0
#define UBLKSRV_IO_BUF_OFFSET    0x80000000ULL
#define UBLK_IO_BUF_BITS         25
#define UBLK_TAG_OFF             UBLK_IO_BUF_BITS
#define UBLK_TAG_BITS            16
#define UBLK_QID_OFF             (UBLK_TAG_OFF + UBLK_TAG_BITS)

struct ublksrv_ctrl_cmd {
	uint32_t dev_id;
	uint16_t queue_id;
	uint16_t len;
	uint64_t addr;
	uint64_t data[1];
	uint16_t dev_path_len;
	uint16_t pad;
	uint32_t reserved;
};

struct ublksrv_ctrl_dev_info {
	uint16_t nr_hw_queues;
	uint16_t queue_depth;
	uint16_t state;
	uint16_t pad0;
	uint32_t max_io_buf_bytes;
	uint32_t dev_id;
	int32_t ublksrv_pid;
	uint32_t pad1;
	uint64_t flags;
	uint64_t ublksrv_flags; /* ours; the kernel stores it and ignores it */
	uint32_t owner_uid;
	uint32_t owner_gid;
	uint64_t reserved1;
	uint64_t reserved2;
};

struct ublksrv_io_desc {
	uint32_t op_flags;
	uint32_t nr_sectors;
	uint64_t start_sector;
	uint64_t addr;
};

struct ublksrv_io_cmd {
	uint16_t q_id;
	uint16_t tag;
	int32_t result;
	uint64_t addr;
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
	uint16_t reserved0;
};

struct ublk_param_devt {
	uint32_t char_major;
	uint32_t char_minor;
	uint32_t disk_major;
	uint32_t disk_minor;
};

struct ublk_param_zoned {
	uint32_t max_open_zones;
	uint32_t max_active_zones;
	uint32_t max_zone_append_sectors;
	uint8_t reserved[20];
};

/* The 6.12 layout; 6.15+ append blocks we do not send, so len stays at the size of this struct. */
struct ublk_params {
	uint32_t len;
	uint32_t types;
	struct ublk_param_basic basic;
	struct ublk_param_discard discard;
	struct ublk_param_devt devt;
	struct ublk_param_zoned zoned;
};

_Static_assert(sizeof(struct ublksrv_ctrl_cmd) == 32, "ctrl_cmd is 32 bytes");
_Static_assert(sizeof(struct ublksrv_ctrl_dev_info) == 64, "dev_info is 64 bytes");
_Static_assert(sizeof(struct ublksrv_io_desc) == 24, "io_desc is 24 bytes");
_Static_assert(sizeof(struct ublksrv_io_cmd) == 16, "io_cmd is 16 bytes");
_Static_assert(sizeof(struct ublk_params) == 112, "6.12 ublk_params is 112 bytes");
_Static_assert(offsetof(struct ublksrv_ctrl_cmd, data) == 16, "ctrl_cmd.data");
_Static_assert(offsetof(struct ublksrv_ctrl_cmd, dev_path_len) == 24, "ctrl_cmd.dev_path_len");
_Static_assert(offsetof(struct ublksrv_ctrl_dev_info, flags) == 24, "dev_info.flags");
_Static_assert(offsetof(struct ublksrv_ctrl_dev_info, owner_uid) == 40, "dev_info.owner_uid");
_Static_assert(offsetof(struct ublk_params, basic) == 8, "params.basic");
_Static_assert(offsetof(struct ublk_params, discard) == 40, "params.discard");
_Static_assert(offsetof(struct ublk_params, devt) == 60, "params.devt");
_Static_assert(offsetof(struct ublk_params, zoned) == 76, "params.zoned");
_Static_assert(offsetof(struct ublk_param_basic, dev_sectors) == 16, "basic.dev_sectors");
_Static_assert(UBLK_U_CMD_GET_FEATURES == 0x80207513u, "GET_FEATURES encoding");
_Static_assert(UBLK_U_CMD_ADD_DEV == 0xc0207504u, "ADD_DEV encoding");
_Static_assert(UBLK_U_IO_FETCH_REQ == 0xc0107520u, "FETCH_REQ encoding");
_Static_assert(UBLK_U_IO_COMMIT_AND_FETCH_REQ == 0xc0107521u, "COMMIT_AND_FETCH encoding");

/* Where a request's data lives in user-copy mode: pread/pwrite the char device at this offset. */
static inline uint64_t ublk_user_copy_pos(uint16_t q_id, uint16_t tag)
{
	return UBLKSRV_IO_BUF_OFFSET + ((uint64_t)q_id << UBLK_QID_OFF) + ((uint64_t)tag << UBLK_TAG_OFF);
}

/* Byte offset of queue q's descriptor array in the char device's mmap space. */
static inline uint64_t ublk_desc_mmap_offset(uint16_t q_id)
{
	/* round_up(UBLK_MAX_QUEUE_DEPTH * sizeof(iod), 4 KiB) per queue, fixed by the driver */
	return UBLKSRV_CMD_BUF_OFFSET + (uint64_t)q_id * 98304;
}

#endif
