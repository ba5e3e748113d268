/*
 * ublk-runner native core.  See uring.h for the contract and docs/architecture.rst for the picture.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include <liburing.h>

#include "ublk_abi.h"
#include "uring.h"

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

/* user_data layout of our SQEs: kind in the top byte, tag in the low 16 bits */
#define UD_IO     (1ULL << 56)
#define UD_WAKE   (2ULL << 56)
#define UD_CANCEL (3ULL << 56)
#define UD_TARGET (4ULL << 56) /* native file IO on the backing fd */
#define UD_TIMER  (5ULL << 56) /* native null's injected latency */
#define UD_FWD    (6ULL << 56) /* a forwarded request's IO on the backing fd */
#define UD_KIND(ud) ((ud) & (0xffULL << 56))

#define CTRL_STAGING 4096
#define CTRL_CANCEL_GRACE_MS 5000

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ------------------------------------------------------------------ control */

struct ubc {
	struct io_uring ring;
	int ctrl_fd;
	int event_fd;
	int pending;
	uint32_t pending_len;
	/* The kernel reads and writes the payload here, not in the caller's buffer, so a command that
	 * outlives a timeout can never write into memory Python has already freed. */
	uint8_t staging[CTRL_STAGING];
};

int ubc_open(struct ubc **out)
{
	struct ubc *c = calloc(1, sizeof(*c));
	int ret;

	if (!c)
		return -ENOMEM;
	c->ctrl_fd = open("/dev/ublk-control", O_RDWR | O_CLOEXEC);
	if (c->ctrl_fd < 0) {
		ret = -errno;
		free(c);
		return ret;
	}
	ret = io_uring_queue_init(4, &c->ring, IORING_SETUP_SQE128);
	if (ret < 0)
		goto close_fd;
	c->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (c->event_fd < 0) {
		ret = -errno;
		goto exit_ring;
	}
	ret = io_uring_register_eventfd(&c->ring, c->event_fd);
	if (ret < 0)
		goto close_efd;
	*out = c;
	return 0;
close_efd:
	close(c->event_fd);
exit_ring:
	io_uring_queue_exit(&c->ring);
close_fd:
	close(c->ctrl_fd);
	free(c);
	return ret;
}

void ubc_close(struct ubc *c)
{
	if (!c)
		return;
	if (c->pending) {
		/* A command we could not cancel still owns c->staging: leak it rather than free memory
		 * the kernel may write into. */
		return;
	}
	io_uring_queue_exit(&c->ring);
	close(c->event_fd);
	close(c->ctrl_fd);
	free(c);
}

int ubc_event_fd(struct ubc *c)
{
	return c->event_fd;
}

int ubc_submit(struct ubc *c, uint32_t cmd_op, uint32_t dev_id, uint16_t q_id,
	       const void *buf, uint32_t len, uint64_t data0)
{
	struct ublksrv_ctrl_cmd hdr = {0};
	struct io_uring_sqe *sqe;
	int ret;

	if (c->pending)
		return -EBUSY;
	if (len > CTRL_STAGING)
		return -EINVAL;
	sqe = io_uring_get_sqe(&c->ring);
	if (!sqe)
		return -EBUSY;
	memset(sqe, 0, 2 * sizeof(*sqe)); /* SQE128: liburing 2.3 clears neither half */
	if (len && buf)
		memcpy(c->staging, buf, len);
	else if (len)
		memset(c->staging, 0, len);
	hdr.dev_id = dev_id;
	hdr.queue_id = q_id;
	hdr.len = (uint16_t)len;
	hdr.addr = len ? (uint64_t)(uintptr_t)c->staging : 0;
	hdr.data[0] = data0;
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = c->ctrl_fd;
	sqe->cmd_op = cmd_op;
	sqe->user_data = UD_IO;
	memcpy(sqe->cmd, &hdr, sizeof(hdr));
	ret = io_uring_submit(&c->ring);
	if (ret < 0)
		return ret;
	c->pending = 1;
	c->pending_len = len;
	return 0;
}

/* Wait for a CQE with the given user_data kind, discarding others (cancel acknowledgements). */
static int ubc_wait_kind(struct ubc *c, uint64_t kind, int timeout_ms, int *res)
{
	int64_t deadline = timeout_ms < 0 ? 0 : now_ns() + (int64_t)timeout_ms * 1000000;

	for (;;) {
		struct io_uring_cqe *cqe;
		struct __kernel_timespec ts;
		int ret;

		if (timeout_ms < 0) {
			ret = io_uring_wait_cqe(&c->ring, &cqe);
		} else {
			int64_t left = deadline - now_ns();
			if (left < 0)
				left = 0;
			ts.tv_sec = left / 1000000000;
			ts.tv_nsec = left % 1000000000;
			ret = io_uring_wait_cqe_timeout(&c->ring, &cqe, &ts);
		}
		if (ret == -EINTR)
			continue;
		if (ret == -ETIME)
			return -EAGAIN;
		if (ret < 0)
			return ret;
		if (UD_KIND(cqe->user_data) == kind) {
			*res = cqe->res;
			io_uring_cqe_seen(&c->ring, cqe);
			return 0;
		}
		io_uring_cqe_seen(&c->ring, cqe);
	}
}

int ubc_reap(struct ubc *c, int timeout_ms, void *buf_out, uint32_t len)
{
	uint64_t drain;
	int res, ret;

	if (!c->pending)
		return -EINVAL;
	ret = ubc_wait_kind(c, UD_IO, timeout_ms, &res);
	if (ret == -EAGAIN && timeout_ms != 0) {
		/* Bounded wait expired: cancel (io-wq interrupts the blocked command) and wait for it. */
		struct io_uring_sqe *sqe = io_uring_get_sqe(&c->ring);
		if (sqe) {
			io_uring_prep_cancel64(sqe, UD_IO, 0);
			sqe->user_data = UD_CANCEL;
			io_uring_submit(&c->ring);
		}
		ret = ubc_wait_kind(c, UD_IO, CTRL_CANCEL_GRACE_MS, &res);
		if (ret == 0)
			res = -ETIMEDOUT;
		else
			return -ETIMEDOUT; /* still pending: ubc_close will leak the staging area */
	} else if (ret < 0) {
		return ret;
	}
	c->pending = 0;
	if (read(c->event_fd, &drain, sizeof(drain)) < 0) {
		/* nothing to drain */
	}
	if (buf_out && len)
		memcpy(buf_out, c->staging, len < c->pending_len ? len : c->pending_len);
	return res;
}

int ubc_cmd(struct ubc *c, uint32_t cmd_op, uint32_t dev_id, uint16_t q_id,
	    void *buf, uint32_t len, uint64_t data0, int timeout_ms)
{
	int ret = ubc_submit(c, cmd_op, dev_id, q_id, buf, len, data0);

	if (ret < 0)
		return ret;
	return ubc_reap(c, timeout_ms, buf, len);
}

/* ------------------------------------------------------------------ queues */

enum tag_state {
	TAG_KERNEL = 0,     /* a FETCH or COMMIT_AND_FETCH is in flight */
	TAG_BACKEND = 1,    /* the backend holds the request */
	TAG_COMPLETING = 2, /* completed by the backend, commit not yet queued */
	TAG_ABORTED = 3,    /* the kernel aborted the tag; never reused */
	TAG_FORWARDED = 4,  /* forwarded: the core owns it until its IO completes (no ubq_complete) */
};

struct ubq {
	struct io_uring ring;
	int cdev_fd;
	uint16_t q_id;
	uint16_t depth;
	uint32_t max_io_bytes;
	uint64_t dev_flags;
	int user_copy;
	int pollable;
	int native;
	pthread_t owner;
	int fetched;

	const struct ublksrv_io_desc *iods;
	size_t iods_len;
	uint8_t *bufs; /* buffer mode: depth * max_io_bytes, lazily backed */
	size_t bufs_len;

	_Atomic uint8_t *state;
	int64_t *t_deliver;
	int32_t *remote_result;
	/* Lock-free stack of tags completed by other threads; -1 terminates. */
	_Atomic int32_t remote_head;
	int32_t *remote_next;
	int wake_fd;
	uint64_t wake_val;
	int poll_fd;

	/* native targets */
	int backing_fd;
	uint8_t *tbufs; /* native file in user-copy mode: per-tag staging buffers */
	size_t tbufs_len;
	struct __kernel_timespec null_latency;
	uint32_t null_error_ops; /* bit per UBLK_IO_OP_* */
	int32_t null_error;
	int forward;        /* ubq_set_forward_fd was called: slot 1 is the forward target */
	uint64_t *fwd_host; /* per tag: host offset of the forwarded IO, reported back on completion */

	struct ubq_stats st;
};

static struct io_uring_sqe *ubq_get_sqe(struct ubq *q)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&q->ring);

	if (!sqe) {
		io_uring_submit(&q->ring);
		sqe = io_uring_get_sqe(&q->ring);
	}
	return sqe;
}

static int ubq_queue_io_cmd(struct ubq *q, uint32_t cmd_op, uint16_t tag, int32_t result)
{
	struct io_uring_sqe *sqe = ubq_get_sqe(q);
	struct ublksrv_io_cmd *cmd;

	if (!sqe)
		return -EBUSY;
	memset(sqe, 0, sizeof(*sqe));
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = 0; /* fixed file 0: the char device */
	sqe->flags = IOSQE_FIXED_FILE;
	sqe->cmd_op = cmd_op;
	sqe->user_data = UD_IO | tag;
	cmd = (struct ublksrv_io_cmd *)sqe->cmd;
	cmd->q_id = q->q_id;
	cmd->tag = tag;
	cmd->result = result;
	cmd->addr = q->user_copy ? 0 : (uint64_t)(uintptr_t)(q->bufs + (size_t)tag * q->max_io_bytes);
	return 0;
}

static int ubq_arm_wake(struct ubq *q)
{
	struct io_uring_sqe *sqe = ubq_get_sqe(q);

	if (!sqe)
		return -EBUSY;
	io_uring_prep_read(sqe, q->wake_fd, &q->wake_val, sizeof(q->wake_val), 0);
	sqe->user_data = UD_WAKE;
	return 0;
}

int ubq_open(struct ubq **out, int cdev_fd, uint16_t q_id, uint16_t depth,
	     uint32_t max_io_bytes, uint64_t dev_flags, int pollable)
{
	struct io_uring_params p;
	long page = sysconf(_SC_PAGESIZE);
	struct ubq *q;
	int ret, i;

	if (depth == 0 || depth > UBLK_MAX_QUEUE_DEPTH || max_io_bytes == 0)
		return -EINVAL;
	q = calloc(1, sizeof(*q));
	if (!q)
		return -ENOMEM;
	q->cdev_fd = cdev_fd;
	q->q_id = q_id;
	q->depth = depth;
	q->max_io_bytes = max_io_bytes;
	q->dev_flags = dev_flags;
	q->user_copy = !!(dev_flags & UBLK_F_USER_COPY);
	q->wake_fd = -1;
	q->poll_fd = -1;
	atomic_store(&q->remote_head, -1);

	q->state = calloc(depth, sizeof(*q->state));
	q->t_deliver = calloc(depth, sizeof(*q->t_deliver));
	q->remote_result = calloc(depth, sizeof(*q->remote_result));
	q->remote_next = calloc(depth, sizeof(*q->remote_next));
	if (!q->state || !q->t_deliver || !q->remote_result || !q->remote_next) {
		ret = -ENOMEM;
		goto fail;
	}

	q->iods_len = ((size_t)depth * sizeof(struct ublksrv_io_desc) + page - 1) & ~((size_t)page - 1);
	q->iods = mmap(NULL, q->iods_len, PROT_READ, MAP_SHARED | MAP_POPULATE, cdev_fd,
		       (off_t)ublk_desc_mmap_offset(q_id));
	if (q->iods == MAP_FAILED) {
		q->iods = NULL;
		ret = -errno;
		goto fail;
	}
	if (!q->user_copy) {
		q->bufs_len = (size_t)depth * max_io_bytes;
		q->bufs = mmap(NULL, q->bufs_len, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (q->bufs == MAP_FAILED) {
			q->bufs = NULL;
			ret = -errno;
			goto fail;
		}
	}

	q->wake_fd = eventfd(0, EFD_CLOEXEC);
	if (q->wake_fd < 0) {
		ret = -errno;
		goto fail;
	}
	memset(&p, 0, sizeof(p));
	/* COOP_TASKRUN still wakes a task sleeping in epoll/io_uring_enter; it only skips the IPI to
	 * a running one, which picks the work up at its next syscall. */
	p.flags = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
	/* A queue driven only by ubq_run's own wait can defer task work to that wait (6.1+): no
	 * signal-style wakeups, completions batched.  An event-loop queue cannot: its owner sleeps
	 * in epoll, where deferred work would never run. */
	if (!pollable)
		p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
	q->pollable = pollable;
	ret = io_uring_queue_init_params(depth + 8, &q->ring, &p);
	if (ret < 0 && !pollable) {
		memset(&p, 0, sizeof(p));
		p.flags = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
		ret = io_uring_queue_init_params(depth + 8, &q->ring, &p);
	}
	if (ret < 0) {
		p.flags = 0;
		ret = io_uring_queue_init_params(depth + 8, &q->ring, &p);
	}
	if (ret < 0)
		goto fail;
	{
		int files[2] = {cdev_fd, -1}; /* slot 1: a native target's backing file */
		ret = io_uring_register_files(&q->ring, files, 2);
	}
	if (ret < 0) {
		io_uring_queue_exit(&q->ring);
		goto fail;
	}
	for (i = 0; i < depth; i++)
		atomic_store(&q->state[i], TAG_ABORTED); /* nothing in flight until ubq_fetch_all */
	q->st.aborted = depth;
	*out = q;
	return 0;
fail:
	if (q->wake_fd >= 0)
		close(q->wake_fd);
	if (q->bufs)
		munmap(q->bufs, q->bufs_len);
	if (q->iods)
		munmap((void *)q->iods, q->iods_len);
	free((void *)q->state);
	free(q->t_deliver);
	free(q->remote_result);
	free(q->remote_next);
	free(q);
	return ret;
}

void ubq_close(struct ubq *q)
{
	if (!q)
		return;
	/* Ring teardown cancels whatever is still in flight; the driver then treats the queue as dead
	 * (or quiesced, with recovery).  munmap and close drop our references to the char device. */
	io_uring_queue_exit(&q->ring);
	if (q->poll_fd >= 0)
		close(q->poll_fd);
	close(q->wake_fd);
	if (q->bufs)
		munmap(q->bufs, q->bufs_len);
	if (q->tbufs)
		munmap(q->tbufs, q->tbufs_len);
	munmap((void *)q->iods, q->iods_len);
	free(q->fwd_host);
	free((void *)q->state);
	free(q->t_deliver);
	free(q->remote_result);
	free(q->remote_next);
	free(q);
}

int ubq_fetch_all(struct ubq *q)
{
	int i, ret;

	if (q->fetched)
		return -EALREADY;
	q->owner = pthread_self();
	for (i = 0; i < q->depth; i++) {
		atomic_store(&q->state[i], TAG_KERNEL);
		ret = ubq_queue_io_cmd(q, UBLK_U_IO_FETCH_REQ, i, -1);
		if (ret < 0)
			return ret;
	}
	ret = ubq_arm_wake(q);
	if (ret < 0)
		return ret;
	ret = io_uring_submit(&q->ring);
	if (ret < 0)
		return ret;
	q->st.aborted = 0;
	q->fetched = 1;
	return 0;
}

int ubq_set_native(struct ubq *q, int kind)
{
	if (kind != UBQ_NATIVE_NONE && kind != UBQ_NATIVE_NULL)
		return -EINVAL;
	q->native = kind;
	return 0;
}

int ubq_set_native_null(struct ubq *q, uint32_t latency_us, uint32_t error_ops, int32_t error)
{
	q->native = UBQ_NATIVE_NULL;
	q->null_latency.tv_sec = latency_us / 1000000;
	q->null_latency.tv_nsec = (long long)(latency_us % 1000000) * 1000;
	q->null_error_ops = error_ops;
	q->null_error = error > 0 ? -error : error;
	return 0;
}

/* Put fd in fixed slot 1 and, in user-copy mode, map per-tag staging buffers (the kernel does not
 * let io_uring read or write the char device's user-copy window with fixed buffers, and a direct
 * file<->cdev copy would need splice; a bounce buffer plus one pread/pwrite is the simple way). */
static int ubq_attach_backing(struct ubq *q, int fd)
{
	int ret;

	if (q->fetched)
		return -EBUSY;
	if (fd < 0)
		return -EBADF;
	ret = io_uring_register_files_update(&q->ring, 1, &fd, 1);
	if (ret < 0)
		return ret;
	if (q->user_copy && !q->tbufs) {
		q->tbufs_len = (size_t)q->depth * q->max_io_bytes;
		q->tbufs = mmap(NULL, q->tbufs_len, PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (q->tbufs == MAP_FAILED) {
			q->tbufs = NULL;
			return -errno;
		}
	}
	q->backing_fd = fd;
	return 0;
}

int ubq_set_native_file(struct ubq *q, int fd)
{
	int ret = ubq_attach_backing(q, fd);

	if (ret < 0)
		return ret;
	q->native = UBQ_NATIVE_FILE;
	return 0;
}

int ubq_set_forward_fd(struct ubq *q, int fd)
{
	int ret;

	if (q->native != UBQ_NATIVE_NONE)
		return -EINVAL; /* a native target already owns slot 1 and every request */
	if (!q->fwd_host) {
		q->fwd_host = calloc(q->depth, sizeof(*q->fwd_host));
		if (!q->fwd_host)
			return -ENOMEM;
	}
	ret = ubq_attach_backing(q, fd);
	if (ret < 0)
		return ret;
	q->forward = 1;
	return 0;
}

int ubq_user_copy(struct ubq *q)
{
	return q->user_copy;
}

void *ubq_tag_buffer(struct ubq *q, uint16_t tag)
{
	if (q->user_copy || tag >= q->depth)
		return NULL;
	return q->bufs + (size_t)tag * q->max_io_bytes;
}

static unsigned lat_bucket(int64_t ns)
{
	uint64_t us = ns > 0 ? (uint64_t)ns / 1000 : 0;
	unsigned b = 0;

	while (us && b < UBQ_LAT_BUCKETS - 1) {
		us >>= 1;
		b++;
	}
	return b;
}

/* Queue the commit of a request the backend held; state must already be TAG_COMPLETING. */
static void ubq_commit(struct ubq *q, uint16_t tag, int32_t result)
{
	const struct ublksrv_io_desc *iod = &q->iods[tag];
	unsigned op = iod->op_flags & 0xff;

	/* READ committed with 0 bytes turns into -EIO in the driver; say so explicitly. */
	if (op == UBLK_IO_OP_READ && result == 0 && iod->nr_sectors)
		result = -EIO;
	if (result < 0)
		q->st.errors++;
	else if (op < UBQ_NR_OPS)
		q->st.bytes[op] += (uint64_t)result;
	q->st.lat_us[lat_bucket(now_ns() - q->t_deliver[tag])]++;
	q->st.in_flight--;
	atomic_store(&q->state[tag], TAG_KERNEL);
	ubq_queue_io_cmd(q, UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, result);
}

static int ubq_take(struct ubq *q, uint16_t tag)
{
	uint8_t expect = TAG_BACKEND;

	if (tag >= q->depth)
		return 0;
	return atomic_compare_exchange_strong(&q->state[tag], &expect, TAG_COMPLETING);
}

static void ubq_drain_remote(struct ubq *q)
{
	int32_t tag = atomic_exchange(&q->remote_head, -1);

	while (tag >= 0) {
		int32_t next = q->remote_next[tag];
		ubq_commit(q, (uint16_t)tag, q->remote_result[tag]);
		tag = next;
	}
}

int ubq_complete(struct ubq *q, uint16_t tag, int32_t result)
{
	int32_t old;

	if (!ubq_take(q, tag)) {
		__atomic_fetch_add(&q->st.bad_completions, 1, __ATOMIC_RELAXED);
		return -EINVAL;
	}
	if (q->fetched && pthread_equal(pthread_self(), q->owner)) {
		ubq_commit(q, tag, result);
		return 0;
	}
	q->remote_result[tag] = result;
	old = atomic_load(&q->remote_head);
	do {
		q->remote_next[tag] = old;
	} while (!atomic_compare_exchange_weak(&q->remote_head, &old, (int32_t)tag));
	if (old < 0) {
		uint64_t one = 1;
		__atomic_fetch_add(&q->st.signals, 1, __ATOMIC_RELAXED);
		if (write(q->wake_fd, &one, sizeof(one)) < 0)
			return -errno;
	}
	return 0;
}

int ubq_poll_fd(struct ubq *q)
{
	int ret;

	if (q->poll_fd >= 0)
		return q->poll_fd;
	if (!q->pollable)
		return -EINVAL;
	q->poll_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (q->poll_fd < 0)
		return -errno;
	ret = io_uring_register_eventfd(&q->ring, q->poll_fd);
	if (ret < 0) {
		close(q->poll_fd);
		q->poll_fd = -1;
		return ret;
	}
	return q->poll_fd;
}

static int32_t null_result(const struct ublksrv_io_desc *iod)
{
	unsigned op = iod->op_flags & 0xff;

	return (op == UBLK_IO_OP_READ || op == UBLK_IO_OP_WRITE) ? (int32_t)iod->nr_sectors << 9 : 0;
}

static void ubq_native_commit(struct ubq *q, uint16_t tag, int32_t res)
{
	atomic_store(&q->state[tag], TAG_COMPLETING);
	ubq_commit(q, tag, res);
}

static void ubq_native_null(struct ubq *q, uint16_t tag, const struct ublksrv_io_desc *iod)
{
	unsigned op = iod->op_flags & 0xff;
	struct io_uring_sqe *sqe;

	if (op < 32 && (q->null_error_ops & (1U << op))) {
		ubq_native_commit(q, tag, q->null_error);
		return;
	}
	if (q->null_latency.tv_sec || q->null_latency.tv_nsec) {
		sqe = ubq_get_sqe(q);
		if (sqe) {
			io_uring_prep_timeout(sqe, &q->null_latency, 0, 0);
			sqe->user_data = UD_TIMER | tag;
			return;
		}
	}
	ubq_native_commit(q, tag, null_result(iod));
}

static uint8_t *ubq_data_buf(struct ubq *q, uint16_t tag)
{
	return (q->user_copy ? q->tbufs : q->bufs) + (size_t)tag * q->max_io_bytes;
}

/* Native file: start the backing-file IO for a request; it completes as a UD_TARGET CQE. */
static void ubq_native_file(struct ubq *q, uint16_t tag, const struct ublksrv_io_desc *iod)
{
	unsigned op = iod->op_flags & 0xff;
	uint64_t off = iod->start_sector << 9;
	uint32_t len = iod->nr_sectors << 9;
	uint8_t *buf = ubq_data_buf(q, tag);
	struct io_uring_sqe *sqe;

	if (op == UBLK_IO_OP_WRITE && q->user_copy) {
		ssize_t n = pread(q->cdev_fd, buf, len, (off_t)ublk_user_copy_pos(q->q_id, tag));
		if (n != (ssize_t)len) {
			ubq_native_commit(q, tag, n < 0 ? -errno : -EIO);
			return;
		}
	}
	sqe = ubq_get_sqe(q);
	if (!sqe) {
		ubq_native_commit(q, tag, -EAGAIN);
		return;
	}
	switch (op) {
	case UBLK_IO_OP_READ:
		io_uring_prep_read(sqe, 1, buf, len, off);
		break;
	case UBLK_IO_OP_WRITE:
		io_uring_prep_write(sqe, 1, buf, len, off);
		if (iod->op_flags & UBLK_IO_F_FUA)
			sqe->rw_flags = RWF_DSYNC;
		break;
	case UBLK_IO_OP_FLUSH:
		io_uring_prep_fsync(sqe, 1, IORING_FSYNC_DATASYNC);
		break;
	case UBLK_IO_OP_DISCARD:
		io_uring_prep_fallocate(sqe, 1, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
		break;
	case UBLK_IO_OP_WRITE_ZEROES:
		io_uring_prep_fallocate(sqe, 1, (iod->op_flags & UBLK_IO_F_NOUNMAP ?
				FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE) | FALLOC_FL_KEEP_SIZE, off, len);
		break;
	default:
		io_uring_prep_nop(sqe);
		sqe->user_data = UD_TARGET | tag;
		q->remote_result[tag] = -EOPNOTSUPP; /* tag is ours until committed: reuse the slot */
		return;
	}
	sqe->flags |= IOSQE_FIXED_FILE;
	sqe->user_data = UD_TARGET | tag;
	q->remote_result[tag] = 0;
}

static void ubq_native_file_done(struct ubq *q, uint16_t tag, int32_t res)
{
	const struct ublksrv_io_desc *iod = &q->iods[tag];
	unsigned op = iod->op_flags & 0xff;
	uint32_t len = iod->nr_sectors << 9;

	if (q->remote_result[tag] < 0) {
		res = q->remote_result[tag];
	} else if (op == UBLK_IO_OP_WRITE_ZEROES && res == -EOPNOTSUPP) {
		/* tmpfs and others lack ZERO_RANGE: punch the hole, then allocate it again */
		uint64_t off = iod->start_sector << 9;
		if (fallocate(q->backing_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, len) < 0 ||
		    fallocate(q->backing_fd, FALLOC_FL_KEEP_SIZE, (off_t)off, len) < 0)
			res = -errno;
		else
			res = 0;
	} else if (op == UBLK_IO_OP_READ && res >= 0) {
		uint8_t *buf = ubq_data_buf(q, tag);
		if ((uint32_t)res < len) { /* past the end of a shorter file reads as zeros */
			memset(buf + res, 0, len - res);
			res = (int32_t)len;
		}
		if (q->user_copy && pwrite(q->cdev_fd, buf, len, (off_t)ublk_user_copy_pos(q->q_id, tag)) != (ssize_t)len)
			res = -EIO;
	}
	ubq_native_commit(q, tag, res);
}

/* Start one forwarded request: like ubq_native_file, but at the backend's host offset, and only
 * READ/WRITE (ubq_forward checked that).  Failures before the IO is queued still go through a
 * UD_FWD completion (a NOP carrying the error), so every forward is reported exactly once. */
static void ubq_forward_one(struct ubq *q, uint16_t tag, uint64_t host)
{
	const struct ublksrv_io_desc *iod = &q->iods[tag];
	unsigned op = iod->op_flags & 0xff;
	uint32_t len = iod->nr_sectors << 9;
	uint8_t *buf = ubq_data_buf(q, tag);
	struct io_uring_sqe *sqe;
	int32_t early = 0;

	atomic_store(&q->state[tag], TAG_FORWARDED);
	q->fwd_host[tag] = host;
	q->st.forwarded++;
	if (op == UBLK_IO_OP_WRITE && q->user_copy) {
		ssize_t n = pread(q->cdev_fd, buf, len, (off_t)ublk_user_copy_pos(q->q_id, tag));
		if (n != (ssize_t)len)
			early = n < 0 ? -errno : -EIO;
	}
	sqe = ubq_get_sqe(q);
	if (!sqe) {
		/* cannot happen with depth+8 SQ slots and a submit on full; never lose the tag */
		q->remote_result[tag] = -EAGAIN;
		ubq_native_commit(q, tag, -EAGAIN);
		return;
	}
	if (early) {
		io_uring_prep_nop(sqe);
	} else if (op == UBLK_IO_OP_READ) {
		io_uring_prep_read(sqe, 1, buf, len, host);
		sqe->flags |= IOSQE_FIXED_FILE;
	} else {
		io_uring_prep_write(sqe, 1, buf, len, host);
		sqe->flags |= IOSQE_FIXED_FILE;
		if (iod->op_flags & UBLK_IO_F_FUA)
			sqe->rw_flags = RWF_DSYNC;
	}
	sqe->user_data = UD_FWD | tag;
	q->remote_result[tag] = early; /* tag is ours until committed: reuse the slot */
}

int ubq_forward(struct ubq *q, const uint16_t *tags, const uint64_t *host_offs, uint32_t n)
{
	uint32_t i;

	if (!q->forward)
		return -EBADF;
	/* All or nothing: a caller must never believe a request was forwarded when it was not. */
	for (i = 0; i < n; i++) {
		uint16_t tag = tags[i];
		unsigned op;

		if (tag >= q->depth || atomic_load(&q->state[tag]) != TAG_BACKEND)
			return -EINVAL;
		op = q->iods[tag].op_flags & 0xff;
		if (op != UBLK_IO_OP_READ && op != UBLK_IO_OP_WRITE)
			return -EINVAL;
		if ((uint64_t)q->iods[tag].nr_sectors << 9 > q->max_io_bytes)
			return -EINVAL;
	}
	for (i = 0; i < n; i++)
		ubq_forward_one(q, tags[i], host_offs[i]);
	return (int)n;
}

/* A forwarded IO completed: finish the data copy, commit, and describe it in *out. */
static void ubq_forward_done(struct ubq *q, uint16_t tag, int32_t res, struct ubq_req *out)
{
	const struct ublksrv_io_desc *iod = &q->iods[tag];
	uint32_t op_flags = iod->op_flags;
	uint32_t len = iod->nr_sectors << 9;

	if (q->remote_result[tag] < 0) {
		res = q->remote_result[tag];
	} else if ((op_flags & 0xff) == UBLK_IO_OP_READ && res >= 0) {
		uint8_t *buf = ubq_data_buf(q, tag);
		if ((uint32_t)res < len) { /* past the end of the file reads as zeros */
			memset(buf + res, 0, len - res);
			res = (int32_t)len;
		}
		if (q->user_copy && pwrite(q->cdev_fd, buf, len, (off_t)ublk_user_copy_pos(q->q_id, tag)) != (ssize_t)len)
			res = -EIO;
	}
	if (res < 0)
		q->st.forward_errors++;
	out->offset = q->fwd_host[tag];
	out->length = (uint32_t)res;
	out->op_flags = op_flags | UBQ_REQ_FORWARDED;
	out->tag = tag;
	/* commit last: after it the kernel may reuse the tag and rewrite its descriptor */
	ubq_native_commit(q, tag, res);
}

/* A request arrived for tag: serve it natively or hand it out.  Returns 1 if handed out. */
static int ubq_deliver(struct ubq *q, uint16_t tag, struct ubq_req *out)
{
	const struct ublksrv_io_desc *iod = &q->iods[tag];
	unsigned op = iod->op_flags & 0xff;

	q->st.in_flight++;
	if (op < UBQ_NR_OPS)
		q->st.ops[op]++;
	q->t_deliver[tag] = now_ns();
	atomic_store(&q->state[tag], TAG_BACKEND);
	if (q->native == UBQ_NATIVE_NULL) {
		ubq_native_null(q, tag, iod);
		return 0;
	}
	if (q->native == UBQ_NATIVE_FILE) {
		ubq_native_file(q, tag, iod);
		return 0;
	}
	out->offset = iod->start_sector << 9;
	out->length = iod->nr_sectors << 9;
	out->op_flags = iod->op_flags;
	out->tag = tag;
	return 1;
}

/* Reap completions; returns the number of requests written to out. */
static uint32_t ubq_reap(struct ubq *q, struct ubq_req *out, uint32_t max_out)
{
	struct io_uring_cqe *cqe;
	unsigned head, seen = 0;
	uint32_t n = 0;

	io_uring_for_each_cqe(&q->ring, head, cqe) {
		uint64_t ud = cqe->user_data;
		uint16_t tag = ud & 0xffff;

		if (n >= max_out)
			break;
		seen++;
		if (UD_KIND(ud) == UD_WAKE) {
			ubq_drain_remote(q);
			if (cqe->res >= 0 || cqe->res == -EINTR || cqe->res == -ECANCELED)
				ubq_arm_wake(q);
			continue;
		}
		if (tag >= q->depth)
			continue;
		if (UD_KIND(ud) == UD_TARGET) {
			ubq_native_file_done(q, tag, cqe->res);
			continue;
		}
		if (UD_KIND(ud) == UD_FWD) {
			ubq_forward_done(q, tag, cqe->res, out + n);
			n++;
			continue;
		}
		if (UD_KIND(ud) == UD_TIMER) {
			ubq_native_commit(q, tag, null_result(&q->iods[tag]));
			continue;
		}
		if (UD_KIND(ud) != UD_IO)
			continue;
		switch (cqe->res) {
		case UBLK_IO_RES_OK:
			n += ubq_deliver(q, tag, out + n);
			break;
		case UBLK_IO_RES_NEED_GET_DATA:
			/* Buffer mode with NEED_GET_DATA: hand the kernel the tag's buffer for the write. */
			ubq_queue_io_cmd(q, UBLK_U_IO_NEED_GET_DATA, tag, 0);
			break;
		case UBLK_IO_RES_ABORT:
			atomic_store(&q->state[tag], TAG_ABORTED);
			q->st.aborted++;
			break;
		default:
			/* -EINVAL/-EBUSY mean a protocol bug on our side; the tag is lost either way. */
			atomic_store(&q->state[tag], TAG_ABORTED);
			q->st.aborted++;
			q->st.kernel_errors++;
			q->st.last_kernel_error = cqe->res;
			break;
		}
	}
	io_uring_cq_advance(&q->ring, seen);
	return n;
}

int ubq_run(struct ubq *q, const uint16_t *tags, const int32_t *results, uint32_t n_done,
	    struct ubq_req *out, uint32_t max_out, int timeout_ms)
{
	int64_t deadline = timeout_ms > 0 ? now_ns() + (int64_t)timeout_ms * 1000000 : 0;
	uint32_t i, n = 0;
	uint64_t drain;

	if (!q->fetched)
		return -EINVAL;
	for (i = 0; i < n_done; i++) {
		if (ubq_take(q, tags[i]))
			ubq_commit(q, tags[i], results[i]);
		else
			q->st.bad_completions++;
	}
	if (q->poll_fd >= 0 && read(q->poll_fd, &drain, sizeof(drain)) < 0) {
		/* not signalled: nothing to reset */
	}
	ubq_drain_remote(q);

	for (;;) {
		struct io_uring_cqe *cqe;
		struct __kernel_timespec ts;
		int ret;

		n += ubq_reap(q, out + n, max_out - n);
		if (n || q->st.aborted == q->depth)
			break;
		if (timeout_ms == 0) {
			ret = io_uring_submit_and_get_events(&q->ring);
			if (ret < 0 && ret != -EINTR)
				return ret;
			n += ubq_reap(q, out + n, max_out - n);
			break;
		}
		q->st.waits++;
		if (timeout_ms < 0) {
			ret = io_uring_submit_and_wait(&q->ring, 1);
		} else {
			int64_t left = deadline - now_ns();
			if (left <= 0) {
				io_uring_submit(&q->ring);
				break;
			}
			ts.tv_sec = left / 1000000000;
			ts.tv_nsec = left % 1000000000;
			ret = io_uring_submit_and_wait_timeout(&q->ring, &cqe, 1, &ts, NULL);
		}
		if (ret == -EINTR) {
			/* Give Python a chance to run its signal handlers (Ctrl-C). */
			io_uring_submit(&q->ring);
			break;
		}
		if (ret < 0 && ret != -ETIME)
			return ret;
	}
	/* Commits queued by native completions must reach the kernel before we leave. */
	if (io_uring_sq_ready(&q->ring))
		io_uring_submit(&q->ring);
	if (n == 0 && q->st.aborted == q->depth)
		return -ENODEV;
	if (n)
		q->st.batches++;
	return (int)n;
}

ssize_t ubq_copy_from_req(struct ubq *q, uint16_t tag, void *dst, size_t len, size_t off)
{
	ssize_t ret;

	if (tag >= q->depth || off + len > q->max_io_bytes)
		return -EINVAL;
	if (!q->user_copy) {
		memcpy(dst, q->bufs + (size_t)tag * q->max_io_bytes + off, len);
		return (ssize_t)len;
	}
	ret = pread(q->cdev_fd, dst, len, (off_t)(ublk_user_copy_pos(q->q_id, tag) + off));
	return ret < 0 ? -errno : ret;
}

ssize_t ubq_copy_to_req(struct ubq *q, uint16_t tag, const void *src, size_t len, size_t off)
{
	ssize_t ret;

	if (tag >= q->depth || off + len > q->max_io_bytes)
		return -EINVAL;
	if (!q->user_copy) {
		memcpy(q->bufs + (size_t)tag * q->max_io_bytes + off, src, len);
		return (ssize_t)len;
	}
	ret = pwrite(q->cdev_fd, src, len, (off_t)(ublk_user_copy_pos(q->q_id, tag) + off));
	return ret < 0 ? -errno : ret;
}

void ubq_get_stats(struct ubq *q, struct ubq_stats *out)
{
	*out = q->st;
	out->bad_completions = __atomic_load_n(&q->st.bad_completions, __ATOMIC_RELAXED);
	out->signals = __atomic_load_n(&q->st.signals, __ATOMIC_RELAXED);
}

int ub_fallocate(int fd, int mode, uint64_t offset, uint64_t length)
{
	return fallocate(fd, mode, (off_t)offset, (off_t)length) < 0 ? -errno : 0;
}

int ub_set_io_flusher(void)
{
	return prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) < 0 ? -errno : 0;
}
