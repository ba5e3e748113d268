/*
 * ublk-runner native core: the ublk protocol over io_uring.
 *
 * Two objects:
 *   ubc  a control ring on /dev/ublk-control (SQE128), one command in flight at a time;
 *   ubq  one queue of one device: its ring, its descriptor mmap and, in buffer mode, its buffers.
 *
 * Thread rules (the kernel's, made explicit): a ubq is opened, run and closed by one thread, its
 * owner.  ubq_complete() and the data copies may be called from any thread.  The core never
 * creates a thread.  Every function returns 0 or a count on success and -errno on failure.
 */
#ifndef UBLK_RUNNER_URING_H
#define UBLK_RUNNER_URING_H

#include <stdint.h>
#include <sys/types.h>

struct ubc;
struct ubq;

/* ---- control ---- */
int ubc_open(struct ubc **out);
void ubc_close(struct ubc *c);
/* eventfd that becomes readable when the pending control command completes */
int ubc_event_fd(struct ubc *c);
/* Send one command; buf (len bytes, may be NULL) is the payload at ctrl_cmd.addr. */
int ubc_submit(struct ubc *c, uint32_t cmd_op, uint32_t dev_id, uint16_t q_id,
	       const void *buf, uint32_t len, uint64_t data0);
/* Wait up to timeout_ms (-1: forever, 0: poll) for the pending command.  Returns its result and
 * copies the payload back into buf_out; -EAGAIN if not done yet; -ETIMEDOUT after cancelling it. */
int ubc_reap(struct ubc *c, int timeout_ms, void *buf_out, uint32_t len);
/* ubc_submit + ubc_reap */
int ubc_cmd(struct ubc *c, uint32_t cmd_op, uint32_t dev_id, uint16_t q_id,
	    void *buf, uint32_t len, uint64_t data0, int timeout_ms);

/* ---- queues ---- */

/* A request handed to the backend: 24 bytes, unpacked in Python as "<QIIH6x". */
struct ubq_req {
	uint64_t offset;   /* bytes */
	uint32_t length;   /* bytes (0 for FLUSH) */
	uint32_t op_flags; /* UBLK_IO_OP_* in bits 0-7, UBLK_IO_F_* above */
	uint16_t tag;
	uint16_t pad[3];
};

/* Native targets: requests that complete inside the core and never reach Python. */
#define UBQ_NATIVE_NONE 0
#define UBQ_NATIVE_NULL 1
#define UBQ_NATIVE_FILE 2

#define UBQ_NR_OPS 6 /* indexed by UBLK_IO_OP_* (READ..WRITE_ZEROES) */
#define UBQ_LAT_BUCKETS 24 /* log2 microsecond buckets */

struct ubq_stats {
	uint64_t ops[UBQ_NR_OPS];
	uint64_t bytes[UBQ_NR_OPS];
	uint64_t errors;          /* requests committed with a negative result */
	uint64_t in_flight;       /* requests the backend holds right now */
	uint64_t bad_completions; /* completions for a tag the backend did not hold */
	uint64_t kernel_errors;   /* unexpected CQE results from the driver */
	int32_t last_kernel_error;
	uint32_t aborted;         /* tags the kernel has aborted */
	uint64_t lat_us[UBQ_LAT_BUCKETS];
	uint64_t forwarded;       /* READ/WRITE requests the backend forwarded (ubq_forward) */
	uint64_t forward_errors;  /* of those, how many completed with an error */
	uint64_t signals;         /* wake-ups of the owner by other threads' completions (eventfd) */
	uint64_t waits;           /* times ubq_run blocked waiting for the ring */
	uint64_t batches;         /* ubq_run calls that returned requests */
};

/* pollable: the queue will be driven from an event loop through ubq_poll_fd.  Otherwise the
 * ring defers task work to ubq_run's wait (cheaper) and ubq_poll_fd fails with -EINVAL.
 * Open queue q_id of the device whose char device is cdev_fd (not taken over: caller closes it
 * after ubq_close).  dev_flags are the flags ADD_DEV wrote back; they select user-copy or buffer mode. */
int ubq_open(struct ubq **out, int cdev_fd, uint16_t q_id, uint16_t depth,
	     uint32_t max_io_bytes, uint64_t dev_flags, int pollable);
void ubq_close(struct ubq *q);
/* Owner thread: submit FETCH_REQ for every tag; makes the caller the queue's daemon. */
int ubq_fetch_all(struct ubq *q);
int ubq_set_native(struct ubq *q, int kind);
/* Native null with injected latency (an io_uring timeout per request) and errors: requests whose
 * op bit is set in error_ops fail with -error. */
int ubq_set_native_null(struct ubq *q, uint32_t latency_us, uint32_t error_ops, int32_t error);
/* Native file: serve every request with io_uring on fd (a file or block device), before fetch. */
int ubq_set_native_file(struct ubq *q, int fd);
/*
 * Owner thread: commit n_done results (tags[i] -> results[i]), then wait up to timeout_ms for
 * requests and write at most max_out of them to out.  Returns the number written (0 on timeout or
 * on a signal), or -ENODEV once the kernel has aborted every tag (the device is stopping).
 */
int ubq_run(struct ubq *q, const uint16_t *tags, const int32_t *results, uint32_t n_done,
	    struct ubq_req *out, uint32_t max_out, int timeout_ms);
/*
 * Forwarding: a Python-served queue resolves a READ/WRITE to one contiguous range of a file
 * (e.g. a qcow2 image cluster) and lets the core move the data and commit, so the payload never
 * passes through Python.  ubq_set_forward_fd (before ubq_fetch_all) registers the file in fixed
 * slot 1, the slot the native file target uses.  ubq_forward (owner thread) starts tags[i] at
 * host_offs[i] in that file; the IO is submitted with the next ubq_run.  When it completes the core
 * commits the request itself and ubq_run reports it in `out` as an entry whose op_flags carry
 * UBQ_REQ_FORWARDED, offset = the host offset, length = the result (an int32: bytes or -errno),
 * so the backend learns when the host range is no longer in use.  FUA writes use RWF_DSYNC.
 * ubq_forward checks every entry first (owned by the backend, READ or WRITE, fits max_io_bytes)
 * and starts none on -EINVAL.
 */
#define UBQ_REQ_FORWARDED (1U << 31)
int ubq_set_forward_fd(struct ubq *q, int fd);
int ubq_forward(struct ubq *q, const uint16_t *tags, const uint64_t *host_offs, uint32_t n);
/* Any thread: complete one request; handed to the owner through a lock-free list + eventfd. */
int ubq_complete(struct ubq *q, uint16_t tag, int32_t result);
/* Owner thread: an fd that is readable whenever ubq_run(timeout 0) has work; for event loops. */
int ubq_poll_fd(struct ubq *q);
/* Any thread, while the backend holds the request: move its data. */
ssize_t ubq_copy_from_req(struct ubq *q, uint16_t tag, void *dst, size_t len, size_t off);
ssize_t ubq_copy_to_req(struct ubq *q, uint16_t tag, const void *src, size_t len, size_t off);
/* Buffer mode only: the tag's data buffer (NULL in user-copy mode). */
void *ubq_tag_buffer(struct ubq *q, uint16_t tag);
int ubq_user_copy(struct ubq *q);
void ubq_get_stats(struct ubq *q, struct ubq_stats *out);

/* fallocate(2) with flags (Python's os module has only posix_fallocate). */
int ub_fallocate(int fd, int mode, uint64_t offset, uint64_t length);

/* Mark the calling thread as one that serves a block device (PR_SET_IO_FLUSHER). */
int ub_set_io_flusher(void);

#endif
