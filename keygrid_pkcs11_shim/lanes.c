/* lanes.c - libkeygrid-worker.so: a module worker's lanes served in C.
 *
 * keygridd's pkcs11 provider runs each PKCS#11 module in a worker process of
 * its own (keygridd/providers/pkcs11/worker.py, which also describes the lane
 * protocol). The worker loads and initialises the module in Python, says
 * hello, and then hands its lanes to kg_lanes_serve(): one thread per lane
 * reads request frames and answers them in order.
 *
 * The calls of a cryptographic operation are answered here, on the module's
 * function list, without the interpreter:
 *
 *   C_EncryptInit C_DecryptInit C_SignInit C_SignRecoverInit C_VerifyInit
 *   C_VerifyRecoverInit C_DigestInit   (a mechanism with no parameter, or a
 *                                       byte-string one not in the pointer list)
 *   the single-part, update and final calls with an output (outlen rules as
 *   ckapi.Module._output), C_DigestUpdate C_SignUpdate C_VerifyUpdate
 *   C_VerifyFinal C_Verify C_SeedRandom C_GenerateRandom
 *
 * Anything else -- another method, an argument of another type or shape, a
 * structured mechanism parameter, a function the module leaves NULL, an output
 * above the worker's 64 MiB buffer limit -- goes to the fallback, the worker's Python
 * answer(), which gives the reply. The replies written here are the ones the
 * Python code writes for the same call, message strings included. No value,
 * PIN or datum is ever written to stderr.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "keygrid.h"
#include "lanes.h"

#define MAX_BUFFER ((CK_ULONG)1 << 26) /* ckstructs.MAX_BUFFER */

struct kg_reply {
	struct kg_buf buf;
};

void kg_reply_set(struct kg_reply *out, const uint8_t *frame, size_t len)
{
	out->buf.len = 0;
	kg_put_raw(&out->buf, frame, len);
}

/* ---- the calls served here ---- */

enum shape {
	SH_INIT,   /* session, mechanism, key -> nil */
	SH_DINIT,  /* session, mechanism -> nil */
	SH_OUT,    /* session, bytes, outlen -> out */
	SH_FINAL,  /* session, outlen -> out */
	SH_IN,     /* session, bytes -> nil */
	SH_VERIFY, /* session, bytes, bytes -> nil */
	SH_RANDOM, /* session, length -> bytes */
};

struct fast_call {
	const char *name;
	enum shape shape;
	size_t offset; /* of the function in CK_FUNCTION_LIST */
};

#define FN(name, shape)                                        \
	{                                                      \
#name, shape, offsetof(CK_FUNCTION_LIST, name) \
	}
static const struct fast_call FAST[] = {
        FN(C_EncryptInit, SH_INIT),
        FN(C_DecryptInit, SH_INIT),
        FN(C_SignInit, SH_INIT),
        FN(C_SignRecoverInit, SH_INIT),
        FN(C_VerifyInit, SH_INIT),
        FN(C_VerifyRecoverInit, SH_INIT),
        FN(C_DigestInit, SH_DINIT),
        FN(C_Encrypt, SH_OUT),
        FN(C_EncryptUpdate, SH_OUT),
        FN(C_Decrypt, SH_OUT),
        FN(C_DecryptUpdate, SH_OUT),
        FN(C_Digest, SH_OUT),
        FN(C_Sign, SH_OUT),
        FN(C_SignRecover, SH_OUT),
        FN(C_VerifyRecover, SH_OUT),
        FN(C_DigestEncryptUpdate, SH_OUT),
        FN(C_DecryptDigestUpdate, SH_OUT),
        FN(C_SignEncryptUpdate, SH_OUT),
        FN(C_DecryptVerifyUpdate, SH_OUT),
        FN(C_EncryptFinal, SH_FINAL),
        FN(C_DecryptFinal, SH_FINAL),
        FN(C_DigestFinal, SH_FINAL),
        FN(C_SignFinal, SH_FINAL),
        FN(C_DigestUpdate, SH_IN),
        FN(C_SignUpdate, SH_IN),
        FN(C_VerifyUpdate, SH_IN),
        FN(C_VerifyFinal, SH_IN),
        FN(C_SeedRandom, SH_IN),
        FN(C_Verify, SH_VERIFY),
        FN(C_GenerateRandom, SH_RANDOM),
};
#undef FN

typedef CK_RV (*fn_init)(CK_SESSION_HANDLE, CK_MECHANISM_PTR, CK_OBJECT_HANDLE);
typedef CK_RV (*fn_dinit)(CK_SESSION_HANDLE, CK_MECHANISM_PTR);
typedef CK_RV (*fn_out)(CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR);
typedef CK_RV (*fn_final)(CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG_PTR);
typedef CK_RV (*fn_in)(CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG);
typedef CK_RV (*fn_verify)(CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG);

/* The decoded arguments of one fast call. outlen: has_out 0 = nil (no limit), -1 = a length query, 1 = n. */
struct args {
	CK_ULONG session, key, number;
	CK_MECHANISM mech;
	uint8_t *param; /* a copy: a module may write to its parameter */
	const uint8_t *data, *data2;
	size_t data_len, data2_len;
	int has_out;
	CK_ULONG out_len;
};

static int get_ulong(struct kg_reader *r, CK_ULONG *v)
{
	uint64_t u;
	if (kg_peek(r) != KG_T_UINT || kg_get_uint(r, &u) < 0 || u > (uint64_t)(CK_ULONG)-1) return -1;
	*v = (CK_ULONG)u;
	return 0;
}

static int get_bytes(struct kg_reader *r, const uint8_t **p, size_t *n)
{
	return kg_peek(r) == KG_T_BIN ? kg_get_bin(r, p, n) : -1;
}

static int get_outlen(struct kg_reader *r, struct args *a)
{
	switch (kg_peek(r)) {
	case KG_T_NIL:
		a->has_out = 0;
		return kg_get_nil(r);
	case KG_T_INT: {
		int64_t v;
		if (kg_get_int(r, &v) < 0 || v != -1) return -1;
		a->has_out = -1;
		return 0;
	}
	default:
		a->has_out = 1;
		return get_ulong(r, &a->out_len);
	}
}

static int pointer_param(const struct kg_lanes *L, CK_ULONG mechanism)
{
	for (size_t i = 0; i < L->n_pointer_params; i++)
		if (L->pointer_params[i] == mechanism) return 1;
	return 0;
}

/* [number, nil | bin]; -1 for a structured parameter or a pointer-holding byte string (Python's to refuse). */
static int get_mechanism(const struct kg_lanes *L, struct kg_reader *r, struct args *a)
{
	uint32_t n;
	if (kg_peek(r) != KG_T_ARRAY || kg_get_array(r, &n) < 0 || n != 2 || get_ulong(r, &a->number) < 0) return -1;
	a->mech.mechanism = a->number;
	a->mech.pParameter = NULL;
	a->mech.ulParameterLen = 0;
	if (kg_peek(r) == KG_T_NIL) return kg_get_nil(r);
	const uint8_t *p;
	size_t len;
	if (get_bytes(r, &p, &len) < 0) return -1;
	if (len == 0) return 0; /* NULL_PTR, as ckstructs._copy */
	if (pointer_param(L, a->number)) return -1;
	a->param = malloc(len);
	if (!a->param) return -1;
	memcpy(a->param, p, len);
	a->mech.pParameter = a->param;
	a->mech.ulParameterLen = len;
	return 0;
}

static int decode(const struct kg_lanes *L, struct kg_reader *r, const struct fast_call *c, struct args *a)
{
	static const uint32_t ARITY[] = {[SH_INIT] = 3, [SH_DINIT] = 2,  [SH_OUT] = 3,   [SH_FINAL] = 2,
	                                 [SH_IN] = 2,   [SH_VERIFY] = 3, [SH_RANDOM] = 2};
	uint32_t n;
	if (kg_peek(r) != KG_T_ARRAY || kg_get_array(r, &n) < 0 || n != ARITY[c->shape]) return -1;
	if (get_ulong(r, &a->session) < 0) return -1;
	switch (c->shape) {
	case SH_INIT:
		return get_mechanism(L, r, a) < 0 ? -1 : get_ulong(r, &a->key);
	case SH_DINIT:
		return get_mechanism(L, r, a);
	case SH_OUT:
		return get_bytes(r, &a->data, &a->data_len) < 0 ? -1 : get_outlen(r, a);
	case SH_FINAL:
		return get_outlen(r, a);
	case SH_IN:
		return get_bytes(r, &a->data, &a->data_len);
	case SH_VERIFY:
		return get_bytes(r, &a->data, &a->data_len) < 0 ? -1 : get_bytes(r, &a->data2, &a->data2_len);
	case SH_RANDOM:
		return get_ulong(r, &a->out_len) < 0 || a->out_len > MAX_BUFFER ? -1 : 0;
	}
	return -1;
}

/* ---- replies ---- */

static void reply_ok_nil(struct kg_buf *b)
{
	kg_put_array(b, 2);
	kg_put_uint(b, 0);
	kg_put_nil(b);
}

/* [rv, nil, message]: an error without a partial result. */
static void reply_error(struct kg_buf *b, CK_RV rv, const char *message)
{
	kg_put_array(b, 3);
	kg_put_uint(b, rv);
	kg_put_nil(b);
	kg_put_str(b, message, strlen(message));
}

/* [rv, nil, "<name>: the module's answer"], as ckapi._check raises it. */
static void reply_rv(struct kg_buf *b, CK_RV rv, const char *name)
{
	char msg[96];
	snprintf(msg, sizeof msg, "%s: the module's answer", name);
	reply_error(b, rv, msg);
}

/* [CKR_BUFFER_TOO_SMALL, [nil, needed], "<name>"], as ckapi.Module._output raises it. */
static void reply_too_small(struct kg_buf *b, CK_ULONG needed, const char *name)
{
	kg_put_array(b, 3);
	kg_put_uint(b, CKR_BUFFER_TOO_SMALL);
	kg_put_array(b, 2);
	kg_put_nil(b);
	kg_put_uint(b, needed);
	kg_put_str(b, name, strlen(name));
}

static CK_RV call_out(const struct fast_call *c, void *fn, struct args *a, CK_BYTE_PTR out, CK_ULONG *len)
{
	if (c->shape == SH_FINAL) return ((fn_final)fn)(a->session, out, len);
	return ((fn_out)fn)(a->session, (CK_BYTE_PTR)a->data, a->data_len, out, len);
}

/* The outlen convention of ckapi.Module._output: nil = no limit (one retry at the module's length),
 * -1 = a length query, n = the caller's buffer of n bytes. -1: the fallback's (before the module ran). */
static int answer_out(const struct fast_call *c, void *fn, struct args *a, struct kg_buf *b)
{
	CK_ULONG len = 0;
	if (a->has_out == -1) {
		CK_RV rv = call_out(c, fn, a, NULL, &len);
		if (rv != CKR_OK) return reply_rv(b, rv, c->name), 0;
		kg_put_array(b, 2);
		kg_put_uint(b, 0);
		kg_put_array(b, 2);
		kg_put_nil(b);
		kg_put_uint(b, len);
		return 0;
	}
	CK_ULONG size = (CK_ULONG)a->data_len + 256 > 1024 ? (CK_ULONG)a->data_len + 256 : 1024;
	if (a->has_out == 1 && a->out_len < size) size = a->out_len;
	if (size > MAX_BUFFER) return -1;
	CK_BYTE_PTR out = malloc(size ? size : 1);
	if (!out) return -1;
	len = size;
	CK_RV rv = call_out(c, fn, a, out, &len);
	if (rv == CKR_BUFFER_TOO_SMALL) {
		CK_ULONG needed = len;
		if ((a->has_out == 1 && needed > a->out_len) || needed <= size) {
			free(out);
			return reply_too_small(b, needed, c->name), 0;
		}
		if (needed > MAX_BUFFER) {
			free(out);
			char msg[96];
			snprintf(msg, sizeof msg, "a buffer of %lu bytes is above the worker's limit", needed);
			return reply_error(b, CKR_HOST_MEMORY, msg), 0;
		}
		CK_BYTE_PTR bigger = realloc(out, needed);
		if (!bigger) return free(out), KG_LANE_LOST; /* the module ran: no second try in Python */
		out = bigger;
		size = len = needed;
		rv = call_out(c, fn, a, out, &len);
		if (rv == CKR_BUFFER_TOO_SMALL) {
			free(out);
			return reply_too_small(b, len, c->name), 0;
		}
	}
	if (rv != CKR_OK) {
		free(out);
		return reply_rv(b, rv, c->name), 0;
	}
	CK_ULONG n = len < size ? len : size;
	kg_put_array(b, 2);
	kg_put_uint(b, 0);
	kg_put_array(b, 2);
	kg_put_bin(b, out, n);
	kg_put_uint(b, n);
	free(out);
	return 0;
}

/* The reply body to one fast call; -1: the fallback answers it (the module was not called); KG_LANE_LOST. */
static int answer_fast(const struct kg_lanes *L, const struct fast_call *c, struct args *a, struct kg_buf *b)
{
	void *fn;
	memcpy(&fn, (const char *)L->fl + c->offset, sizeof fn);
	if (!fn) return -1; /* Python names the missing function */
	CK_RV rv;
	switch (c->shape) {
	case SH_INIT:
		rv = ((fn_init)fn)(a->session, &a->mech, a->key);
		break;
	case SH_DINIT:
		rv = ((fn_dinit)fn)(a->session, &a->mech);
		break;
	case SH_IN:
		rv = ((fn_in)fn)(a->session, (CK_BYTE_PTR)a->data, a->data_len);
		break;
	case SH_VERIFY:
		rv = ((fn_verify)fn)(a->session, (CK_BYTE_PTR)a->data, a->data_len, (CK_BYTE_PTR)a->data2,
		                     a->data2_len);
		break;
	case SH_RANDOM: {
		CK_BYTE_PTR out = malloc(a->out_len ? a->out_len : 1);
		if (!out) return -1;
		rv = ((fn_in)fn)(a->session, out, a->out_len);
		if (rv == CKR_OK) {
			kg_put_array(b, 2);
			kg_put_uint(b, 0);
			kg_put_bin(b, out, a->out_len);
		}
		free(out);
		if (rv == CKR_OK) return 0;
		break;
	}
	default:
		return answer_out(c, fn, a, b);
	}
	if (rv != CKR_OK)
		reply_rv(b, rv, c->name);
	else
		reply_ok_nil(b);
	return 0;
}

/* The reply body to a request body when it is a fast call (0); -1 otherwise (the module was not called). */
int kg_lane_answer(const struct kg_lanes *L, const uint8_t *body, size_t len, struct kg_buf *b)
{
	struct kg_reader r = {body, len, 0, 0};
	uint32_t n;
	const char *name;
	size_t name_len;
	if (kg_peek(&r) != KG_T_ARRAY || kg_get_array(&r, &n) < 0 || n != 2) return -1;
	if (kg_peek(&r) != KG_T_STR || kg_get_str(&r, &name, &name_len) < 0) return -1;
	const struct fast_call *c = NULL;
	for (size_t i = 0; i < sizeof FAST / sizeof FAST[0]; i++)
		if (strlen(FAST[i].name) == name_len && !memcmp(FAST[i].name, name, name_len)) {
			c = &FAST[i];
			break;
		}
	if (!c) return -1;
	struct args a = {0};
	int done = -1;
	if (decode(L, &r, c, &a) == 0 && r.pos == r.len) done = answer_fast(L, c, &a, b);
	free(a.param);
	if (done == 0 && b->failed) done = KG_LANE_LOST;
	return done;
}

/* ---- lanes ---- */

static void complain(const char *line)
{
	fprintf(stderr, "keygrid-pkcs11-worker: %s\n", line);
}

static int read_all(int fd, uint8_t *p, size_t n)
{
	while (n) {
		ssize_t got = read(fd, p, n);
		if (got < 0 && errno == EINTR) continue;
		if (got <= 0) return -1;
		p += got;
		n -= (size_t)got;
	}
	return 0;
}

static int write_all(int fd, const uint8_t *p, size_t n)
{
	while (n) {
		ssize_t sent = send(fd, p, n, MSG_NOSIGNAL);
		if (sent < 0 && errno == EINTR) continue;
		if (sent <= 0) return -1;
		p += sent;
		n -= (size_t)sent;
	}
	return 0;
}

struct lane {
	const struct kg_lanes *L;
	int index, fd;
	pthread_t thread;
};

/* Requests and replies until the daemon closes the lane (or a frame is too long); then the fd is closed. */
static void serve(struct lane *lane)
{
	const struct kg_lanes *L = lane->L;
	uint8_t *body = NULL;
	size_t cap = 0;
	struct kg_buf reply = {0};
	struct kg_reply fallback = {{0}};
	for (;;) {
		uint8_t header[4];
		if (read_all(lane->fd, header, 4) < 0) break;
		uint32_t len =
		        (uint32_t)header[0] << 24 | (uint32_t)header[1] << 16 | (uint32_t)header[2] << 8 | header[3];
		if (len == 0 || len > L->max_frame) {
			char line[96];
			snprintf(line, sizeof line, "frame length %u outside 1..%u; closing the lane", len,
			         L->max_frame);
			complain(line);
			break;
		}
		if (len > cap) {
			uint8_t *p = realloc(body, len);
			if (!p) break;
			body = p;
			cap = len;
		}
		if (read_all(lane->fd, body, len) < 0) break;
		reply.len = 0;
		kg_put_raw(&reply, (const uint8_t *)"\0\0\0\0", 4);
		const uint8_t *out;
		size_t out_len;
		int answered = kg_lane_answer(L, body, len, &reply);
		if (answered == KG_LANE_LOST) {
			complain("out of memory for a reply; closing the lane");
			break;
		}
		if (answered == 0) {
			size_t n = reply.len - 4;
			reply.data[0] = (uint8_t)(n >> 24), reply.data[1] = (uint8_t)(n >> 16);
			reply.data[2] = (uint8_t)(n >> 8), reply.data[3] = (uint8_t)n;
			out = reply.data, out_len = reply.len;
		} else {
			reply.failed = 0;
			fallback.buf.len = 0;
			if (L->fallback(lane->index, body, len, &fallback) < 0 || fallback.buf.failed) break;
			out = fallback.buf.data, out_len = fallback.buf.len;
		}
		if (write_all(lane->fd, out, out_len) < 0) break;
	}
	free(body);
	kg_buf_free(&reply);
	kg_buf_free(&fallback.buf);
	close(lane->fd);
}

static void *serve_thread(void *arg)
{
	serve(arg);
	return NULL;
}

int kg_lanes_serve(const int *fds, int n, CK_FUNCTION_LIST *fl, kg_lane_fallback fallback,
                   const CK_ULONG *pointer_params, size_t n_pointer_params, uint32_t max_frame)
{
	if (n < 1 || !fl || !fallback) return -1;
	struct kg_lanes L = {fl, fallback, pointer_params, n_pointer_params, max_frame};
	struct lane *lanes = calloc((size_t)n, sizeof *lanes);
	if (!lanes) return -1;
	int started = 1;
	for (int i = 0; i < n; i++)
		lanes[i] = (struct lane){&L, i, fds[i], 0};
	for (int i = 1; i < n; i++) {
		if (pthread_create(&lanes[i].thread, NULL, serve_thread, &lanes[i]) != 0) {
			for (int j = i; j < n; j++)
				close(lanes[j].fd); /* the daemon sees these lanes end */
			break;
		}
		started++;
	}
	serve(&lanes[0]);
	for (int i = 1; i < started; i++)
		pthread_join(lanes[i].thread, NULL);
	free(lanes);
	return 0;
}
