/*
 * Native data path of the rbd handler: ublk requests go to librbd and come back without Python.
 *
 * Why: in the Python path every request costs a Python call on the queue thread and, worse, a
 * Python callback on librbd's completion thread that must take the GIL from the queue thread
 * (profile in docs/performance.rst).  Here the queue thread hands a whole batch of requests
 * (the core's struct ubq_req array) to rbdq_submit() in one call; librbd's completion callback
 * copies read data into the request and calls the core's ubq_complete() directly, which hands
 * the completion back to the queue thread through the core's lock-free list + eventfd.
 *
 * librbd/librados are not linked: they are dlopen()ed at run time (Debian ships no librbd-dev
 * headers by default and the plugin must import without Ceph installed).  The few prototypes
 * below are librbd's stable C API (librbd.h, librados.h).  The image is opened on a connection
 * of its own (the Python binding does not expose its rbd_image_t); the Python side opens and
 * validates first, so errors are explained there.
 *
 * Core entry points (ubq_complete, ubq_copy_to_req, ubq_copy_from_req) are passed in as function
 * pointers, so this module does not link against the core extension either.
 *
 * Deadlines: each request in librbd has an op record.  rbdq_expire() (called periodically by the
 * handler's watchdog thread) fails requests older than their deadline with -EIO and gives their
 * buffer to the op; the late librbd completion then only frees the op and its buffer and never
 * touches the queue, which may be gone by then.  One mutex per engine orders these hand-overs.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>

#include "rbdio.h"

/* ---- librados / librbd C API, resolved with dlsym ---- */
typedef void *rados_t;
typedef void *rados_ioctx_t;
typedef void *rbd_image_t;
typedef void *rbd_completion_t;
typedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg);

static struct {
	int loaded;
	int (*rados_create2)(rados_t *, const char *, const char *, uint64_t);
	int (*rados_conf_read_file)(rados_t, const char *);
	int (*rados_conf_set)(rados_t, const char *, const char *);
	int (*rados_connect)(rados_t);
	void (*rados_shutdown)(rados_t);
	int (*rados_ioctx_create)(rados_t, const char *, rados_ioctx_t *);
	void (*rados_ioctx_destroy)(rados_ioctx_t);
	void (*rados_ioctx_set_namespace)(rados_ioctx_t, const char *);
	int (*rbd_open)(rados_ioctx_t, const char *, rbd_image_t *, const char *);
	int (*rbd_open_read_only)(rados_ioctx_t, const char *, rbd_image_t *, const char *);
	int (*rbd_close)(rbd_image_t);
	int (*rbd_get_size)(rbd_image_t, uint64_t *);
	int (*rbd_aio_create_completion)(void *, rbd_callback_t, rbd_completion_t *);
	ssize_t (*rbd_aio_get_return_value)(rbd_completion_t);
	void (*rbd_aio_release)(rbd_completion_t);
	int (*rbd_aio_read2)(rbd_image_t, uint64_t, size_t, char *, rbd_completion_t, int);
	int (*rbd_aio_write2)(rbd_image_t, uint64_t, size_t, const char *, rbd_completion_t, int);
	int (*rbd_aio_flush)(rbd_image_t, rbd_completion_t);
	int (*rbd_aio_discard)(rbd_image_t, uint64_t, uint64_t, rbd_completion_t);
	int (*rbd_aio_write_zeroes)(rbd_image_t, uint64_t, size_t, rbd_completion_t, int, int);
} L;

static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;

#define SYM(h, name)                                                   \
	do {                                                           \
		*(void **)&L.name = dlsym(h, #name);                    \
		if (!L.name)                                           \
			goto fail;                                     \
	} while (0)

int rbdio_load(void)
{
	void *ra, *rb;
	int ret = 0;

	pthread_mutex_lock(&load_lock);
	if (L.loaded)
		goto out;
	ra = dlopen("librados.so.2", RTLD_NOW | RTLD_GLOBAL);
	rb = dlopen("librbd.so.1", RTLD_NOW | RTLD_GLOBAL);
	if (!ra || !rb) {
		ret = -ENOENT;
		goto out;
	}
	SYM(ra, rados_create2);
	SYM(ra, rados_conf_read_file);
	SYM(ra, rados_conf_set);
	SYM(ra, rados_connect);
	SYM(ra, rados_shutdown);
	SYM(ra, rados_ioctx_create);
	SYM(ra, rados_ioctx_destroy);
	SYM(ra, rados_ioctx_set_namespace);
	SYM(rb, rbd_open);
	SYM(rb, rbd_open_read_only);
	SYM(rb, rbd_close);
	SYM(rb, rbd_get_size);
	SYM(rb, rbd_aio_create_completion);
	SYM(rb, rbd_aio_get_return_value);
	SYM(rb, rbd_aio_release);
	SYM(rb, rbd_aio_read2);
	SYM(rb, rbd_aio_write2);
	SYM(rb, rbd_aio_flush);
	SYM(rb, rbd_aio_discard);
	SYM(rb, rbd_aio_write_zeroes);
	L.loaded = 1;
	goto out;
fail:
	ret = -ENOSYS;
out:
	pthread_mutex_unlock(&load_lock);
	return ret;
}

/* ---- engine: one connection + one open image ---- */
struct rbdio {
	rados_t cluster;
	rados_ioctx_t ioctx;
	rbd_image_t image;
	pthread_mutex_t mu;          /* op hand-over between callbacks and the watchdog */
	_Atomic int64_t inflight;    /* ops inside librbd, timed-out ones included */
	_Atomic uint64_t errors;     /* requests completed with an error */
	_Atomic uint64_t timed_out;  /* requests failed by rbdq_expire */
	_Atomic uint64_t late;       /* completions that arrived after their deadline */
	/* last error, for the log (racy snapshot is fine) */
	_Atomic int32_t last_err;
	_Atomic uint32_t last_op;
	_Atomic uint64_t last_off;
};

int rbdio_open(struct rbdio **out, const char *name, int read_conf, const char *conf,
	       const char *const *keys, const char *const *vals, int nopts, const char *pool, const char *ns,
	       const char *image, const char *snap, int read_only)
{
	struct rbdio *e;
	int ret, i;

	ret = rbdio_load();
	if (ret < 0)
		return ret;
	e = calloc(1, sizeof(*e));
	if (!e)
		return -ENOMEM;
	pthread_mutex_init(&e->mu, NULL);
	ret = L.rados_create2(&e->cluster, "ceph", name, 0);
	if (ret < 0)
		goto free_e;
	if (read_conf) { /* conf NULL: librados' default search */
		ret = L.rados_conf_read_file(e->cluster, conf);
		if (ret < 0)
			goto shutdown;
	}
	for (i = 0; i < nopts; i++) {
		ret = L.rados_conf_set(e->cluster, keys[i], vals[i]);
		if (ret < 0)
			goto shutdown;
	}
	ret = L.rados_connect(e->cluster);
	if (ret < 0)
		goto shutdown;
	ret = L.rados_ioctx_create(e->cluster, pool, &e->ioctx);
	if (ret < 0)
		goto shutdown;
	if (ns && *ns)
		L.rados_ioctx_set_namespace(e->ioctx, ns);
	if (read_only)
		ret = L.rbd_open_read_only(e->ioctx, image, &e->image, snap);
	else
		ret = L.rbd_open(e->ioctx, image, &e->image, snap);
	if (ret < 0)
		goto ioctx;
	*out = e;
	return 0;
ioctx:
	L.rados_ioctx_destroy(e->ioctx);
shutdown:
	L.rados_shutdown(e->cluster);
free_e:
	pthread_mutex_destroy(&e->mu);
	free(e);
	return ret;
}

int rbdio_set_option(struct rbdio *e, const char *key, const char *val)
{
	return L.rados_conf_set(e->cluster, key, val);
}

int64_t rbdio_size(struct rbdio *e)
{
	uint64_t sz;
	int ret = L.rbd_get_size(e->image, &sz);

	return ret < 0 ? ret : (int64_t)sz;
}

int64_t rbdio_inflight(struct rbdio *e)
{
	return atomic_load(&e->inflight);
}

void rbdio_get_stats(struct rbdio *e, struct rbdio_stats *st)
{
	st->inflight = atomic_load(&e->inflight);
	st->errors = atomic_load(&e->errors);
	st->timed_out = atomic_load(&e->timed_out);
	st->late = atomic_load(&e->late);
	st->last_err = atomic_load(&e->last_err);
	st->last_op = atomic_load(&e->last_op);
	st->last_off = atomic_load(&e->last_off);
}

/* Close the image and the connection; -EBUSY (and nothing closed) while ops are in librbd. */
int rbdio_close(struct rbdio *e)
{
	if (atomic_load(&e->inflight) > 0)
		return -EBUSY;
	L.rbd_close(e->image);
	L.rados_ioctx_destroy(e->ioctx);
	L.rados_shutdown(e->cluster);
	pthread_mutex_destroy(&e->mu);
	free(e);
	return 0;
}

/* ---- per-queue context ---- */
#define UBLK_IO_OP_READ 0
#define UBLK_IO_OP_WRITE 1
#define UBLK_IO_OP_FLUSH 2
#define UBLK_IO_OP_DISCARD 3
#define UBLK_IO_OP_WRITE_ZEROES 5
#define UBLK_IO_F_FUA (1U << 13)
#define UBLK_IO_F_NOUNMAP (1U << 15)
#define LIBRADOS_OP_FLAG_FADVISE_FUA 0x80
#define RBD_WRITE_ZEROES_FLAG_THICK_PROVISION 1

typedef int (*complete_fn)(void *q, uint16_t tag, int32_t result);
typedef ssize_t (*copy_to_fn)(void *q, uint16_t tag, const void *src, size_t len, size_t off);
typedef ssize_t (*copy_from_fn)(void *q, uint16_t tag, void *dst, size_t len, size_t off);

struct rbdop;

struct rbdq {
	struct rbdio *e;
	void *q;
	complete_fn complete;
	copy_to_fn copy_to;
	copy_from_fn copy_from;
	uint16_t depth;
	int64_t timeout_ns;           /* 0: no deadline */
	struct rbdop **ops;           /* in-flight op per tag, under e->mu */
	uint8_t **bufs;               /* staging buffer per tag (NULL: none yet, or given away) */
	uint32_t *buf_len;
};

struct rbdop {
	struct rbdq *rq;              /* only valid while !timed_out */
	struct rbdio *e;
	uint8_t *buf;
	int64_t deadline;
	uint64_t off;
	uint32_t len;
	uint16_t tag;
	uint8_t op;
	uint8_t timed_out;            /* under e->mu */
};

static int64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int rbdq_create(struct rbdq **out, struct rbdio *e, void *q, void *complete, void *copy_to,
		void *copy_from, uint16_t depth, double timeout_s)
{
	struct rbdq *rq = calloc(1, sizeof(*rq));

	if (!rq)
		return -ENOMEM;
	rq->e = e;
	rq->q = q;
	rq->complete = (complete_fn)complete;
	rq->copy_to = (copy_to_fn)copy_to;
	rq->copy_from = (copy_from_fn)copy_from;
	rq->depth = depth;
	rq->timeout_ns = timeout_s > 0 ? (int64_t)(timeout_s * 1e9) : 0;
	rq->ops = calloc(depth, sizeof(*rq->ops));
	rq->bufs = calloc(depth, sizeof(*rq->bufs));
	rq->buf_len = calloc(depth, sizeof(*rq->buf_len));
	if (!rq->ops || !rq->bufs || !rq->buf_len) {
		free(rq->ops);
		free(rq->bufs);
		free(rq->buf_len);
		free(rq);
		return -ENOMEM;
	}
	*out = rq;
	return 0;
}

/* Owner thread, after the queue stopped (no tag is held any more). */
void rbdq_destroy(struct rbdq *rq)
{
	uint16_t t;

	pthread_mutex_lock(&rq->e->mu);
	for (t = 0; t < rq->depth; t++) {
		/* an op still here was never completed: cannot happen once the queue stopped, but
		 * never free memory librbd may still write to */
		if (rq->ops[t]) {
			rq->ops[t]->timed_out = 1;
			rq->ops[t]->buf = rq->bufs[t];
			rq->bufs[t] = NULL;
		}
		free(rq->bufs[t]);
	}
	pthread_mutex_unlock(&rq->e->mu);
	free(rq->ops);
	free(rq->bufs);
	free(rq->buf_len);
	free(rq);
}

static void note_error(struct rbdio *e, uint8_t op, uint64_t off, int32_t err)
{
	atomic_fetch_add(&e->errors, 1);
	atomic_store(&e->last_err, err);
	atomic_store(&e->last_op, op);
	atomic_store(&e->last_off, off);
}

static void finish(struct rbdop *op, ssize_t r)
{
	struct rbdio *e = op->e;
	struct rbdq *rq;
	int32_t res;

	pthread_mutex_lock(&e->mu);
	if (op->timed_out) {
		/* the watchdog already failed the request; the buffer is ours to free */
		pthread_mutex_unlock(&e->mu);
		atomic_fetch_add(&e->late, 1);
		free(op->buf);
		free(op);
		atomic_fetch_sub(&e->inflight, 1);
		return;
	}
	rq = op->rq;
	rq->ops[op->tag] = NULL;
	pthread_mutex_unlock(&e->mu);

	if (r < 0) {
		res = r == -ETIMEDOUT ? -EIO : (int32_t)r;
	} else if (op->op == UBLK_IO_OP_READ) {
		if ((size_t)r != op->len)
			res = -EIO; /* short read: the image shrank under us */
		else if (rq->copy_to(rq->q, op->tag, op->buf, op->len, 0) != (ssize_t)op->len)
			res = -EIO;
		else
			res = (int32_t)op->len;
	} else {
		res = op->op == UBLK_IO_OP_WRITE ? (int32_t)op->len : 0;
	}
	if (res < 0)
		note_error(e, op->op, op->off, res);
	rq->complete(rq->q, op->tag, res);
	free(op);
	atomic_fetch_sub(&e->inflight, 1);
}

static void on_complete(rbd_completion_t c, void *arg)
{
	ssize_t r = L.rbd_aio_get_return_value(c);

	L.rbd_aio_release(c);
	finish((struct rbdop *)arg, r);
}

static uint8_t *tag_buf(struct rbdq *rq, uint16_t tag, uint32_t len)
{
	uint32_t want = len < 4096 ? 4096 : len;

	if (rq->bufs[tag] && rq->buf_len[tag] >= want)
		return rq->bufs[tag];
	free(rq->bufs[tag]);
	rq->bufs[tag] = NULL;
	if (posix_memalign((void **)&rq->bufs[tag], 4096, want))
		return NULL;
	rq->buf_len[tag] = want;
	return rq->bufs[tag];
}

/* Serve one request: 0 if librbd has it, else the -errno to complete it with now. */
static int submit_one(struct rbdq *rq, const struct rbdio_req *req)
{
	struct rbdio *e = rq->e;
	uint8_t opc = req->op_flags & 0xff;
	struct rbdop *op;
	rbd_completion_t c;
	uint8_t *buf = NULL;
	int ret;

	if (req->tag >= rq->depth)
		return -EINVAL;
	if (opc == UBLK_IO_OP_READ || opc == UBLK_IO_OP_WRITE) {
		buf = tag_buf(rq, req->tag, req->length);
		if (!buf)
			return -ENOMEM;
		if (opc == UBLK_IO_OP_WRITE &&
		    rq->copy_from(rq->q, req->tag, buf, req->length, 0) != (ssize_t)req->length)
			return -EIO;
	} else if (opc != UBLK_IO_OP_FLUSH && opc != UBLK_IO_OP_DISCARD &&
		   opc != UBLK_IO_OP_WRITE_ZEROES) {
		return -EOPNOTSUPP;
	}
	op = malloc(sizeof(*op));
	if (!op)
		return -ENOMEM;
	op->rq = rq;
	op->e = e;
	op->buf = buf;
	op->off = req->offset;
	op->len = req->length;
	op->tag = req->tag;
	op->op = opc;
	op->timed_out = 0;
	op->deadline = rq->timeout_ns ? mono_ns() + rq->timeout_ns : 0;
	ret = L.rbd_aio_create_completion(op, on_complete, &c);
	if (ret < 0) {
		free(op);
		return ret;
	}
	pthread_mutex_lock(&e->mu);
	rq->ops[req->tag] = op;
	pthread_mutex_unlock(&e->mu);
	atomic_fetch_add(&e->inflight, 1);
	switch (opc) {
	case UBLK_IO_OP_READ:
		ret = L.rbd_aio_read2(e->image, req->offset, req->length, (char *)buf, c, 0);
		break;
	case UBLK_IO_OP_WRITE:
		ret = L.rbd_aio_write2(e->image, req->offset, req->length, (const char *)buf, c,
				       (req->op_flags & UBLK_IO_F_FUA) ? LIBRADOS_OP_FLAG_FADVISE_FUA : 0);
		break;
	case UBLK_IO_OP_FLUSH:
		ret = L.rbd_aio_flush(e->image, c);
		break;
	case UBLK_IO_OP_DISCARD:
		ret = L.rbd_aio_discard(e->image, req->offset, req->length, c);
		break;
	default: /* WRITE_ZEROES */
		ret = L.rbd_aio_write_zeroes(e->image, req->offset, req->length, c,
					     (req->op_flags & UBLK_IO_F_NOUNMAP) ?
					     RBD_WRITE_ZEROES_FLAG_THICK_PROVISION : 0, 0);
		break;
	}
	if (ret < 0) {
		/* librbd refused it synchronously and will not call back */
		pthread_mutex_lock(&e->mu);
		rq->ops[req->tag] = NULL;
		pthread_mutex_unlock(&e->mu);
		atomic_fetch_sub(&e->inflight, 1);
		L.rbd_aio_release(c);
		free(op);
		return ret;
	}
	return 0;
}

/* Owner thread: hand n requests to librbd; requests refused at once are completed with their
 * error.  Returns the number refused. */
int rbdq_submit(struct rbdq *rq, const struct rbdio_req *reqs, uint32_t n)
{
	uint32_t i;
	int refused = 0;

	for (i = 0; i < n; i++) {
		int ret = submit_one(rq, &reqs[i]);

		if (ret < 0) {
			refused++;
			note_error(rq->e, reqs[i].op_flags & 0xff, reqs[i].offset, ret);
			rq->complete(rq->q, reqs[i].tag, ret);
		}
	}
	return refused;
}

/* Any thread (the watchdog): fail every op whose deadline has passed with -EIO.  Returns how
 * many were failed. */
int rbdq_expire(struct rbdq *rq)
{
	struct rbdio *e = rq->e;
	int64_t now = mono_ns();
	uint16_t t, n = 0;
	uint16_t *late;

	if (!rq->timeout_ns)
		return 0;
	late = malloc(rq->depth * sizeof(*late));
	if (!late)
		return -ENOMEM;
	pthread_mutex_lock(&e->mu);
	for (t = 0; t < rq->depth; t++) {
		struct rbdop *op = rq->ops[t];

		if (op && op->deadline <= now) {
			op->timed_out = 1;
			rq->ops[t] = NULL;
			/* librbd may still write into the buffer: it leaves with the op */
			if (op->buf == rq->bufs[t])
				rq->bufs[t] = NULL;
			late[n++] = t;
			atomic_fetch_add(&e->timed_out, 1);
			note_error(e, op->op, op->off, -EIO);
		}
	}
	pthread_mutex_unlock(&e->mu);
	for (t = 0; t < n; t++) {
		rq->complete(rq->q, late[t], -EIO);
	}
	free(late);
	return n;
}
