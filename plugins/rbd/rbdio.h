/* Native data path of the rbd handler (rbdio.c); see the comment there. */
#ifndef UBLK_RBDIO_H
#define UBLK_RBDIO_H

#include <stdint.h>

struct rbdio;
struct rbdq;

/* Same layout as the core's struct ubq_req (runner/core/uring.h): 24 bytes. */
struct rbdio_req {
	uint64_t offset;
	uint32_t length;
	uint32_t op_flags;
	uint16_t tag;
	uint16_t pad[3];
};

struct rbdio_stats {
	int64_t inflight;
	uint64_t errors;
	uint64_t timed_out;
	uint64_t late;
	int32_t last_err;
	uint32_t last_op;
	uint64_t last_off;
};

int rbdio_load(void);
int rbdio_open(struct rbdio **out, const char *name, int read_conf, const char *conf,
               const char *const *keys,
	       const char *const *vals, int nopts, const char *pool, const char *ns,
	       const char *image, const char *snap, int read_only);
int rbdio_set_option(struct rbdio *e, const char *key, const char *val);
int64_t rbdio_size(struct rbdio *e);
int64_t rbdio_inflight(struct rbdio *e);
void rbdio_get_stats(struct rbdio *e, struct rbdio_stats *st);
int rbdio_close(struct rbdio *e);

int rbdq_create(struct rbdq **out, struct rbdio *e, void *q, void *complete, void *copy_to,
		void *copy_from, uint16_t depth, double timeout_s);
void rbdq_destroy(struct rbdq *rq);
int rbdq_submit(struct rbdq *rq, const struct rbdio_req *reqs, uint32_t n);
int rbdq_expire(struct rbdq *rq);

#endif
