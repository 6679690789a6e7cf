/* transport.c - finding keygridd, the connection pool, frames, reconnect.
 *
 * Rules:
 * - The socket is KEYGRID_SOCKET, else `socket = PATH` in the config file
 *   (KEYGRID_PKCS11_CONF, else /etc/keygrid/pkcs11.conf), else
 *   /run/keygrid/keygrid.sock. Every wait is a poll() bounded by
 *   connect_timeout_ms or call_timeout_ms; sends use MSG_NOSIGNAL.
 * - A pool of connections, each used by one call at a time. The first hello
 *   creates the daemon-side application; every further connection presents its
 *   app_id and joins it. That application is one "generation": any transport
 *   failure (EOF, error, timeout, malformed frame) ends it, because the
 *   daemon drops the application with its last connection.
 * - Session handles carry their generation (KG_HANDLE). Sessions of an ended
 *   generation answer CKR_DEVICE_REMOVED once, then CKR_SESSION_HANDLE_INVALID.
 *   The next call without a session (C_GetSlotList, C_OpenSession, ...) starts
 *   a new generation when the daemon is back.
 * - The module lock (kg_lock) guards this bookkeeping only; it is never held
 *   across I/O.
 * - Busy polling: a call that is the only one of the process in flight polls
 *   its socket for up to busy_poll_us before it sleeps in poll(). A reply
 *   that comes within that time costs no wakeup; when several threads call
 *   at once none of them polls, so they do not take CPU time the daemon
 *   needs. Polling adapts: after a poll that the reply outlasted, the next
 *   2, 4, ... 64 calls do not poll (slow operations, a busy daemon); a poll
 *   that catches its reply resets that.
 * - Deferred init (defer_init = 1): C_EncryptInit, C_DecryptInit,
 *   C_DigestInit, C_SignInit, C_VerifyInit, C_FindObjectsInit and
 *   C_FindObjectsFinal return CKR_OK once their local checks pass; their
 *   frame waits in the session's queue (at most DEFER_MAX) and goes out in
 *   one write with the session's next call, whose connection reads a reply
 *   for each, matched by id (message ids are unique in the process). The
 *   daemon orders requests of one session, so the queue goes ahead of calls
 *   it orders per session; before a call it orders per application (C_Login,
 *   C_Logout, C_InitPIN, C_SetPIN) the queue is sent on its own first;
 *   C_CloseSession drops it. A failed deferred init is remembered for its
 *   family and returned by the next call of that family that reaches the
 *   daemon, in place of that call's own result; a new init of the family
 *   forgets it. Sessions that go away free their queue unsent.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdatomic.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "keygrid.h"

#define POOL_MAX        32 /* connections at once */
#define POOL_IDLE       8  /* idle connections kept */
#define HELLO_MAX_FRAME (1u << 20)

#define DEFER_MAX 4 /* deferred frames per session */

struct kg_conn {
	int fd;
	uint32_t gen;
	int busy;
	struct kg_conn *next;
};

/* The operation families a deferred init can start (FAMILY_*), as bits. */
enum { FAMILY_ENCRYPT, FAMILY_DECRYPT, FAMILY_DIGEST, FAMILY_SIGN, FAMILY_VERIFY, FAMILY_FIND, FAMILIES };

struct deferred {
	struct kg_buf req; /* the whole frame, length prefix included */
	uint32_t id;
	enum kg_method method;
};

struct session {
	CK_SESSION_HANDLE h;
	CK_SLOT_ID slot;
	int removed;
	unsigned nq;
	struct deferred q[DEFER_MAX];
	CK_RV failed[FAMILIES]; /* a deferred init's code, until a call of its family reports it */
};

static struct {
	struct kg_config cfg;
	struct kg_conn *conns;
	int nconns; /* including connections being opened */
	uint32_t gen, max_frame;
	int live;
	uint8_t app_id[16];
	struct session *sessions;
	size_t nsessions, cap;
} T;

static const struct kg_method_info methods[] = {KG_METHODS_INIT};
static atomic_int in_flight;   /* calls of this process waiting for a reply */
static atomic_int poll_skip;   /* calls left that do not busy-poll */
static atomic_int poll_misses; /* busy polls in a row that the reply outlasted */
static atomic_uint last_id;    /* message ids: unique in the process, so a batch can mix connections' frames */

/* ---- configuration ---- */

static char *trim(char *s)
{
	while (*s == ' ' || *s == '\t')
		s++;
	size_t n = strlen(s);
	while (n && strchr(" \t\r\n", s[n - 1]))
		s[--n] = 0;
	return s;
}

void kg_config_load(struct kg_config *cfg)
{
	char line[512];
	const char *env, *path = getenv("KEYGRID_PKCS11_CONF");
	memset(cfg, 0, sizeof(*cfg));
	snprintf(cfg->socket, sizeof(cfg->socket), "%s", "/run/keygrid/keygrid.sock");
	cfg->connect_timeout_ms = 5000;
	cfg->call_timeout_ms = 60000;
	cfg->busy_poll_us = 250;
	FILE *f = fopen(path && *path ? path : "/etc/keygrid/pkcs11.conf", "re");
	while (f && fgets(line, sizeof(line), f)) {
		char *eq = strchr(line, '=');
		if (line[0] == '#' || !eq) continue;
		*eq = 0;
		char *key = trim(line), *value = trim(eq + 1);
		if (!strcmp(key, "socket"))
			snprintf(cfg->socket, sizeof(cfg->socket), "%s", value);
		else if (!strcmp(key, "connect_timeout_ms"))
			cfg->connect_timeout_ms = atoi(value);
		else if (!strcmp(key, "call_timeout_ms"))
			cfg->call_timeout_ms = atoi(value);
		else if (!strcmp(key, "busy_poll_us"))
			cfg->busy_poll_us = atoi(value) < 0 ? 0 : atoi(value) > 10000 ? 10000 : atoi(value);
		else if (!strcmp(key, "defer_init"))
			cfg->defer_init = atoi(value) != 0;
		else if (!strcmp(key, "debug"))
			cfg->debug = atoi(value) != 0;
	}
	if (f) fclose(f);
	if ((env = getenv("KEYGRID_SOCKET")) && *env) snprintf(cfg->socket, sizeof(cfg->socket), "%s", env);
	if ((env = getenv("KEYGRID_PKCS11_DEBUG")) && *env) cfg->debug = atoi(env) != 0;
}

/* ---- sockets with deadlines ---- */

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits for `events` until the deadline (0: none); 0 when ready. */
static int wait_fd(int fd, short events, int64_t deadline)
{
	struct pollfd p = {fd, events, 0};
	for (;;) {
		int left = -1;
		if (deadline) {
			int64_t ms = deadline - now_ms();
			if (ms <= 0) return -1;
			left = ms > 60000 ? 60000 : (int)ms;
		}
		int n = poll(&p, 1, left);
		if (n > 0) return 0;
		if (n < 0 && errno != EINTR) return -1;
	}
}

static int64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Polls for a reply for up to `us` microseconds: the bytes received, or -1 with errno. */
static ssize_t recv_polling(int fd, uint8_t *p, size_t n, int us)
{
	int64_t end = now_us() + us;
	for (;;) {
		ssize_t k = recv(fd, p, n, MSG_DONTWAIT);
		if (k >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) || now_us() >= end) return k;
	}
}

static int64_t deadline_in(int ms)
{
	return ms > 0 ? now_ms() + ms : 0;
}

static int send_all(int fd, const uint8_t *p, size_t n, int64_t deadline)
{
	while (n) {
		ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
		if (k > 0) {
			p += k;
			n -= (size_t)k;
		} else if (k < 0 && errno == EINTR) {
			continue;
		} else if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (wait_fd(fd, POLLOUT, deadline)) return -1;
		} else {
			return -1;
		}
	}
	return 0;
}

static int recv_all(int fd, uint8_t *p, size_t n, int64_t deadline)
{
	while (n) {
		ssize_t k = recv(fd, p, n, 0);
		if (k > 0) {
			p += k;
			n -= (size_t)k;
		} else if (k < 0 && errno == EINTR) {
			continue;
		} else if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (wait_fd(fd, POLLIN, deadline)) return -1;
		} else {
			return -1; /* EOF or error */
		}
	}
	return 0;
}

static int open_socket(const char *path, int timeout_ms)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int64_t deadline = deadline_in(timeout_ms);
	if (strlen(path) >= sizeof(sa.sun_path)) return -1;
	memcpy(sa.sun_path, path, strlen(path));
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0) return -1;
	for (;;) {
		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) return fd;
		if (errno == EINTR) continue;
		if (errno == EINPROGRESS) {
			int err = 0;
			socklen_t len = sizeof(err);
			if (!wait_fd(fd, POLLOUT, deadline) && !getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) &&
			    !err)
				return fd;
		} else if (errno == EAGAIN && (!deadline || now_ms() < deadline)) { /* backlog full */
			struct timespec ts = {0, 5 * 1000000};
			nanosleep(&ts, NULL);
			continue;
		}
		close(fd);
		return -1;
	}
}

/* ---- frames and replies ---- */

/* A request frame the daemon can take: 0, CKR_HOST_MEMORY or CKR_DEVICE_MEMORY. */
static CK_RV frame_check(const struct kg_buf *req, uint32_t max_frame)
{
	if (req->failed || req->len < 5) return CKR_HOST_MEMORY;
	if (req->len - 4 > max_frame) return CKR_DEVICE_MEMORY; /* the daemon would refuse the frame */
	return CKR_OK;
}

/* Sends the frames of calls[0..n) in one write (several when memory is short). */
static int send_frames(int fd, struct kg_call **calls, size_t n, int64_t deadline)
{
	size_t total = 0, off = 0;
	uint8_t *all;
	if (n == 1) return send_all(fd, calls[0]->req.data, calls[0]->req.len, deadline);
	for (size_t i = 0; i < n; i++)
		total += calls[i]->req.len;
	if (!(all = malloc(total))) {
		for (size_t i = 0; i < n; i++)
			if (send_all(fd, calls[i]->req.data, calls[i]->req.len, deadline)) return -1;
		return 0;
	}
	for (size_t i = 0; i < n; i++) {
		memcpy(all + off, calls[i]->req.data, calls[i]->req.len);
		off += calls[i]->req.len;
	}
	int rc = send_all(fd, all, total, deadline);
	free(all);
	return rc;
}

/* Bytes received and not yet taken by a frame. */
struct inbox {
	uint8_t buf[4096];
	size_t have, pos;
};

/* Reads one reply frame into a new buffer. `poll_us`: busy-poll that long before sleeping. */
static CK_RV read_frame(int fd, struct inbox *in, uint32_t max_frame, int64_t deadline, int poll_us, uint8_t **body,
                        size_t *len)
{
	const uint8_t *h;
	if (in->pos && in->have - in->pos < 4) { /* keep the partial header, make room after it */
		memmove(in->buf, in->buf + in->pos, in->have - in->pos);
		in->have -= in->pos;
		in->pos = 0;
	}
	ssize_t k = -1;
	if (poll_us > 0 && in->have - in->pos < 4) {
		k = recv_polling(fd, in->buf + in->have, sizeof(in->buf) - in->have, poll_us);
		if (k > 0) {
			atomic_store(&poll_misses, 0);
		} else if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			int misses = atomic_fetch_add(&poll_misses, 1) + 1;
			atomic_store(&poll_skip, 1 << (misses < 6 ? misses : 6));
		}
	}
	if (k > 0)
		in->have += (size_t)k;
	else if (k == 0)
		return CKR_DEVICE_REMOVED; /* EOF */
	while (in->have - in->pos < 4) {
		if (wait_fd(fd, POLLIN, deadline)) return CKR_DEVICE_REMOVED;
		k = recv(fd, in->buf + in->have, sizeof(in->buf) - in->have, 0);
		if (k > 0)
			in->have += (size_t)k;
		else if (!(k < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)))
			return CKR_DEVICE_REMOVED; /* EOF or error */
	}
	h = in->buf + in->pos;
	*len = (size_t)h[0] << 24 | (size_t)h[1] << 16 | (size_t)h[2] << 8 | h[3];
	if (*len == 0 || *len > max_frame) return CKR_DEVICE_ERROR;
	in->pos += 4;
	size_t got = in->have - in->pos < *len ? in->have - in->pos : *len;
	if (!(*body = malloc(*len))) return CKR_HOST_MEMORY;
	memcpy(*body, in->buf + in->pos, got);
	in->pos += got;
	if (in->pos == in->have) in->pos = in->have = 0;
	return recv_all(fd, *body + got, *len - got, deadline) ? CKR_DEVICE_REMOVED : CKR_OK;
}

/* The request a reply answers: the first unanswered one with its id; a FATAL message ends the
 * connection and is given to the first unanswered one. -1: none. */
static int match_reply(struct kg_call **calls, size_t n, const uint8_t *body, size_t len, int *fatal)
{
	struct kg_reader r = {body, len, 0, 0};
	uint32_t items;
	uint64_t kind, id;
	if (kg_get_array(&r, &items) || kg_get_uint(&r, &kind) || kg_get_uint(&r, &id)) return -1;
	*fatal = kind == 2;
	for (size_t i = 0; i < n; i++)
		if (!calls[i]->reply && (*fatal || id == calls[i]->id)) return (int)i;
	return -1;
}

/* Sends the requests of calls[0..n) together and reads one reply for each into calls[i]->reply
 * (length lens[i]), busy-polling for the first reply for `poll_us` microseconds. `clean`: nothing was sent, the connection stays usable. */
static CK_RV exchange_frames(struct kg_conn *conn, struct kg_call **calls, size_t n, uint32_t max_frame, size_t *lens,
                             int *clean, int poll_us)
{
	struct inbox in = {.have = 0};
	int64_t deadline = deadline_in(T.cfg.call_timeout_ms);
	*clean = 1;
	for (size_t i = 0; i < n; i++) {
		CK_RV rv = frame_check(&calls[i]->req, max_frame);
		if (rv != CKR_OK) return rv;
	}
	*clean = 0;
	for (size_t i = 0; i < n; i++) {
		size_t body = calls[i]->req.len - 4;
		for (int j = 0; j < 4; j++)
			calls[i]->req.data[j] = (uint8_t)(body >> (24 - 8 * j));
	}
	if (send_frames(conn->fd, calls, n, deadline)) return CKR_DEVICE_REMOVED;
	for (size_t done = 0; done < n; done++) {
		uint8_t *body = NULL;
		size_t len = 0;
		int fatal = 0, to;
		CK_RV rv = read_frame(conn->fd, &in, max_frame, deadline, !done ? poll_us : 0, &body, &len);
		if (rv == CKR_OK && (to = match_reply(calls, n, body, len, &fatal)) < 0) rv = CKR_DEVICE_ERROR;
		if (rv != CKR_OK) {
			free(body);
			return rv;
		}
		calls[to]->reply = body;
		lens[to] = len;
		if (fatal) return kg_parse_reply(calls[to], len); /* logs the message: CKR_DEVICE_REMOVED */
	}
	return in.pos < in.have ? CKR_DEVICE_ERROR : CKR_OK; /* nothing may follow the last reply */
}

static CK_RV exchange(struct kg_conn *conn, struct kg_call **calls, size_t n, uint32_t max_frame, size_t *lens,
                      int *clean)
{
	int alone = atomic_fetch_add(&in_flight, 1) == 0, poll_us = 0;
	if (alone && T.cfg.busy_poll_us > 0) {
		int skip = atomic_load(&poll_skip);
		if (skip > 0)
			atomic_store(&poll_skip, skip - 1);
		else
			poll_us = T.cfg.busy_poll_us;
	}
	CK_RV rv = exchange_frames(conn, calls, n, max_frame, lens, clean, poll_us);
	atomic_fetch_sub(&in_flight, 1);
	return rv;
}

/* Checks [1, id, rv, result, message]; leaves c->res at the result. */
CK_RV kg_parse_reply(struct kg_call *c, size_t len)
{
	uint32_t n;
	uint64_t kind, rid, rv;
	struct kg_reader *r = &c->res;
	*r = (struct kg_reader){c->reply, len, 0, 0};
	if (kg_check_value(c->reply, len) || kg_get_array(r, &n) || kg_get_uint(r, &kind)) return CKR_DEVICE_ERROR;
	if (kind == 2 && n == 4) {
		const char *msg = "";
		size_t mlen = 0;
		kg_get_uint(r, &rid);
		kg_get_uint(r, &rv);
		kg_get_str(r, &msg, &mlen);
		KG_DEBUG("daemon closed the connection: %.*s", (int)mlen, msg);
		return CKR_DEVICE_REMOVED;
	}
	if (kind != 1 || n != 5 || kg_get_uint(r, &rid) || rid != c->id || kg_get_uint(r, &rv)) return CKR_DEVICE_ERROR;
	c->rv = (CK_RV)rv;
	if (kg_debug && rv) {
		struct kg_reader m = *r;
		const char *msg;
		size_t mlen;
		if (!kg_skip(&m) && !kg_get_str(&m, &msg, &mlen))
			KG_DEBUG("%s: %.*s", methods[c->method].name, (int)mlen, msg);
	}
	return CKR_OK;
}

/* Starts [0, id, method, [args...]] after room for the 4-byte frame length. */
static void put_header(struct kg_call *c)
{
	struct kg_buf *b = &c->req;
	do
		c->id = atomic_fetch_add(&last_id, 1) + 1;
	while (!c->id);
	b->len = 0;
	for (int i = 0; i < 4; i++)
		kg_put_uint(b, 0); /* four zero bytes */
	kg_put_array(b, 4);
	kg_put_uint(b, 0);
	kg_put_uint(b, c->id);
	kg_put_str(b, methods[c->method].name, strlen(methods[c->method].name));
	kg_put_array(b, methods[c->method].nargs);
}

/* Connects and says hello; joins `app_id` when given. Returns the fd or -1. */
static int connect_hello(const uint8_t *app_id, uint8_t out_id[16], uint32_t *max_frame)
{
	struct kg_conn conn = {.fd = -1};
	struct kg_call c = {.method = KG_M_hello}, *one = &c;
	uint32_t n;
	size_t len;
	int ok = 0, clean;
	static const char *features[] = {"app-join", "outlen"};
	if ((conn.fd = open_socket(T.cfg.socket, T.cfg.connect_timeout_ms)) < 0) return -1;
	put_header(&c);
	kg_put_map(&c.req, 4);
	kg_put_str(&c.req, "versions", 8);
	kg_put_array(&c.req, 2);
	kg_put_uint(&c.req, 1);
	kg_put_uint(&c.req, 1);
	kg_put_str(&c.req, "features", 8);
	kg_put_array(&c.req, 2);
	for (int i = 0; i < 2; i++)
		kg_put_str(&c.req, features[i], strlen(features[i]));
	kg_put_str(&c.req, "app_id", 6);
	if (app_id)
		kg_put_bin(&c.req, app_id, 16);
	else
		kg_put_nil(&c.req);
	kg_put_str(&c.req, "client", 6);
	kg_put_str(&c.req, "libkeygrid-pkcs11", 17);
	if (exchange(&conn, &one, 1, HELLO_MAX_FRAME, &len, &clean) == CKR_OK && kg_parse_reply(&c, len) == CKR_OK &&
	    c.rv == CKR_OK && !kg_get_map(&c.res, &n)) {
		*max_frame = HELLO_MAX_FRAME;
		for (uint32_t i = 0; i < n; i++) {
			const char *key;
			const uint8_t *bin;
			size_t klen, blen;
			uint32_t m;
			uint64_t v;
			if (kg_get_str(&c.res, &key, &klen)) break;
			if (klen == 6 && !memcmp(key, "app_id", 6) && !kg_get_bin(&c.res, &bin, &blen) && blen == 16) {
				memcpy(out_id, bin, 16);
				ok = 1;
			} else if (klen == 6 && !memcmp(key, "limits", 6) && !kg_get_map(&c.res, &m)) {
				for (uint32_t j = 0; j < m; j++) {
					if (kg_get_str(&c.res, &key, &klen)) break;
					if (klen == 9 && !memcmp(key, "max_frame", 9) && !kg_get_uint(&c.res, &v) &&
					    v >= 16)
						*max_frame = v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
					else
						kg_skip(&c.res);
				}
			} else {
				kg_skip(&c.res);
			}
		}
		ok = ok && !c.res.bad;
	}
	kg_buf_free(&c.req);
	free(c.reply);
	if (!ok) {
		close(conn.fd);
		return -1;
	}
	return conn.fd;
}

/* ---- deferred init ---- */

#define FAMILY(name) (1u << FAMILY_##name)

/* The operation families of the calls that take part in one: a deferred init's code is reported by
 * the next call of its family. The dual-function updates belong to both of theirs. */
static const unsigned char families[KG_M_COUNT] = {
        [KG_M_C_EncryptInit] = FAMILY(ENCRYPT),
        [KG_M_C_Encrypt] = FAMILY(ENCRYPT),
        [KG_M_C_EncryptUpdate] = FAMILY(ENCRYPT),
        [KG_M_C_EncryptFinal] = FAMILY(ENCRYPT),
        [KG_M_C_DecryptInit] = FAMILY(DECRYPT),
        [KG_M_C_Decrypt] = FAMILY(DECRYPT),
        [KG_M_C_DecryptUpdate] = FAMILY(DECRYPT),
        [KG_M_C_DecryptFinal] = FAMILY(DECRYPT),
        [KG_M_C_DigestInit] = FAMILY(DIGEST),
        [KG_M_C_Digest] = FAMILY(DIGEST),
        [KG_M_C_DigestUpdate] = FAMILY(DIGEST),
        [KG_M_C_DigestKey] = FAMILY(DIGEST),
        [KG_M_C_DigestFinal] = FAMILY(DIGEST),
        [KG_M_C_SignInit] = FAMILY(SIGN),
        [KG_M_C_Sign] = FAMILY(SIGN),
        [KG_M_C_SignUpdate] = FAMILY(SIGN),
        [KG_M_C_SignFinal] = FAMILY(SIGN),
        [KG_M_C_VerifyInit] = FAMILY(VERIFY),
        [KG_M_C_Verify] = FAMILY(VERIFY),
        [KG_M_C_VerifyUpdate] = FAMILY(VERIFY),
        [KG_M_C_VerifyFinal] = FAMILY(VERIFY),
        [KG_M_C_FindObjectsInit] = FAMILY(FIND),
        [KG_M_C_FindObjects] = FAMILY(FIND),
        [KG_M_C_FindObjectsFinal] = FAMILY(FIND),
        [KG_M_C_DigestEncryptUpdate] = FAMILY(DIGEST) | FAMILY(ENCRYPT),
        [KG_M_C_DecryptDigestUpdate] = FAMILY(DECRYPT) | FAMILY(DIGEST),
        [KG_M_C_SignEncryptUpdate] = FAMILY(SIGN) | FAMILY(ENCRYPT),
        [KG_M_C_DecryptVerifyUpdate] = FAMILY(DECRYPT) | FAMILY(VERIFY),
};

static int is_init(enum kg_method m)
{
	return m == KG_M_C_EncryptInit || m == KG_M_C_DecryptInit || m == KG_M_C_DigestInit || m == KG_M_C_SignInit ||
	       m == KG_M_C_VerifyInit || m == KG_M_C_FindObjectsInit;
}

static int family_index(enum kg_method m) /* of an init: it has one family */
{
	return __builtin_ctz(families[m]);
}

static struct session *find(CK_SESSION_HANDLE h)
{
	for (size_t i = 0; i < T.nsessions; i++)
		if (T.sessions[i].h == h) return &T.sessions[i];
	return NULL;
}

/* Frees a session's deferred frames unsent (the session is going away). */
static void drop_queue(struct session *s)
{
	for (unsigned i = 0; i < s->nq; i++)
		kg_buf_free(&s->q[i].req);
	s->nq = 0;
}

/* Moves a deferrable call's frame to its session's queue: 1 when it is queued. Not when the queue
 * is full: then the call goes out at once, behind the queue, and returns its own code. */
static int defer(struct kg_call *c)
{
	int queued = 0;
	if (!(is_init(c->method) || c->method == KG_M_C_FindObjectsFinal) || kg_lock()) return 0;
	struct session *s = find(c->session);
	if (s && !s->removed && s->nq < DEFER_MAX && frame_check(&c->req, T.max_frame) == CKR_OK) {
		s->q[s->nq++] = (struct deferred){c->req, c->id, c->method};
		c->req = (struct kg_buf){0};
		if (is_init(c->method)) s->failed[family_index(c->method)] = CKR_OK; /* forget the last init's */
		queued = 1;
	}
	kg_unlock();
	if (queued) KG_DEBUG("%s: deferred", methods[c->method].name);
	return queued;
}

/* Takes the session's deferred frames as calls of their own, to be sent with or before `c`.
 * C_CloseSession takes none: they go with the session. Neither does a call whose own frame
 * cannot be sent: it fails alone and the queue waits. */
static size_t take_queue(struct kg_call *c, struct kg_call *out)
{
	size_t n = 0;
	if (c->method == KG_M_C_CloseSession || kg_lock()) return 0;
	struct session *s = find(c->session);
	if (s && !s->removed && frame_check(&c->req, T.max_frame) == CKR_OK) {
		for (; n < s->nq; n++)
			out[n] = (struct kg_call){.method = s->q[n].method, .id = s->q[n].id, .req = s->q[n].req};
		s->nq = 0;
	}
	kg_unlock();
	return n;
}

static void free_calls(struct kg_call *calls, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		kg_buf_free(&calls[i].req);
		free(calls[i].reply);
	}
}

/* After a batch's replies: remembers each deferred init's code for its family (CKR_OK forgets),
 * then, when `own`, gives a call of a family with a remembered failure that code instead of its
 * own. A deferred C_FindObjectsFinal's failure is only logged. */
static void settle(struct kg_call *c, const struct kg_call *queued, size_t nq, int own)
{
	CK_RV report = CKR_OK, final = CKR_OK;
	if (kg_lock()) return;
	struct session *s = find(c->session);
	if (s && s->removed) s = NULL;
	for (size_t i = 0; i < nq; i++) {
		if (!is_init(queued[i].method))
			final = queued[i].rv != CKR_OK ? queued[i].rv : final;
		else if (s)
			s->failed[family_index(queued[i].method)] = queued[i].rv;
	}
	unsigned fam = own && s ? families[c->method] : 0;
	if (fam && is_init(c->method)) /* sent at once (the queue was full): it returned its own code */
		s->failed[family_index(c->method)] = CKR_OK;
	for (int f = 0; f < FAMILIES && fam && !is_init(c->method) && report == CKR_OK; f++) {
		if ((fam & 1u << f) && s->failed[f] != CKR_OK) {
			report = s->failed[f];
			s->failed[f] = CKR_OK;
		}
	}
	kg_unlock();
	if (final != CKR_OK) KG_DEBUG("C_FindObjectsFinal (deferred) -> CK_RV 0x%lx", final);
	if (report != CKR_OK) {
		KG_DEBUG("%s: reports a deferred init's CK_RV 0x%lx", methods[c->method].name, report);
		c->rv = report;
	}
}

/* ---- the pool ---- */

/* Ends generation `gen`: idle connections close, its sessions become removed. */
static void end_generation(uint32_t gen)
{
	struct kg_conn **pp = &T.conns;
	if (gen != T.gen || !T.live) return;
	KG_DEBUG("connection generation %u ended", gen);
	T.live = 0;
	while (*pp) {
		struct kg_conn *c = *pp;
		if (c->gen == gen && !c->busy) {
			*pp = c->next;
			close(c->fd);
			free(c);
			T.nconns--;
		} else {
			pp = &c->next;
		}
	}
	for (size_t i = 0; i < T.nsessions; i++) {
		if ((uint32_t)(T.sessions[i].h >> 32) != gen) continue;
		T.sessions[i].removed = 1;
		drop_queue(&T.sessions[i]);
	}
}

static void release(struct kg_conn *conn, int ok)
{
	int idle = 0;
	if (kg_lock()) return; /* cannot happen after a successful acquire */
	if (!ok) end_generation(conn->gen);
	for (struct kg_conn *c = T.conns; c; c = c->next)
		idle += !c->busy;
	if (ok && conn->gen == T.gen && T.live && idle < POOL_IDLE) {
		conn->busy = 0;
		conn = NULL;
	} else {
		struct kg_conn **pp = &T.conns;
		while (*pp != conn)
			pp = &(*pp)->next;
		*pp = conn->next;
		T.nconns--;
	}
	kg_unlock();
	if (conn) {
		close(conn->fd);
		free(conn);
	}
}

/* A connection of generation `want` (KG_GEN_NONE: the current one, starting
 * a new generation when there is none). */
static CK_RV acquire(uint32_t want, struct kg_conn **out, int *absent)
{
	uint8_t app_id[16];
	uint32_t gen, max_frame;
	for (;;) {
		CK_RV rv = kg_lock();
		if (rv != CKR_OK) return rv;
		if (want != KG_GEN_NONE && (want != T.gen || !T.live)) {
			kg_unlock();
			return CKR_DEVICE_REMOVED;
		}
		for (struct kg_conn *c = T.live ? T.conns : NULL; c; c = c->next) {
			if (!c->busy && c->gen == T.gen) {
				c->busy = 1;
				*out = c;
				kg_unlock();
				return CKR_OK;
			}
		}
		if (T.nconns >= POOL_MAX) {
			struct timespec ts = {0, 1000000};
			kg_unlock();
			nanosleep(&ts, NULL);
			continue;
		}
		int joining = T.live;
		gen = T.gen;
		memcpy(app_id, T.app_id, 16);
		T.nconns++;
		kg_unlock();

		int fd = connect_hello(joining ? app_id : NULL, app_id, &max_frame);
		struct kg_conn *conn = fd >= 0 ? calloc(1, sizeof(*conn)) : NULL;
		if ((rv = kg_lock()) != CKR_OK) {
			if (fd >= 0) close(fd);
			free(conn);
			return rv;
		}
		T.nconns--;
		if (conn && !joining && !T.live) { /* this connection starts a new generation */
			if (++T.gen == KG_GEN_NONE) T.gen = 1;
			T.live = 1;
			T.max_frame = max_frame;
			memcpy(T.app_id, app_id, 16);
			gen = T.gen;
			KG_DEBUG("connected to %s, generation %u", T.cfg.socket, gen);
		}
		if (conn && T.live && gen == T.gen) {
			*conn = (struct kg_conn){fd, gen, 1, T.conns};
			T.conns = conn;
			T.nconns++;
			*out = conn;
			kg_unlock();
			return CKR_OK;
		}
		if (!conn && joining) end_generation(gen); /* the daemon went away or forgot us */
		kg_unlock();
		if (fd >= 0) close(fd);
		free(conn);
		if (!conn && !joining) {
			KG_DEBUG("cannot reach keygridd at %s", T.cfg.socket);
			*absent = 1;
			return CKR_DEVICE_REMOVED;
		}
	}
}

void kg_transport_init(const struct kg_config *cfg)
{
	T.cfg = *cfg;
	atomic_store(&last_id, 0);
}

/* The first connection (and the daemon-side application), made at
 * C_Initialize; an absent daemon is not an error: calls retry later. */
void kg_transport_connect(void)
{
	int absent = 0;
	struct kg_conn *conn;
	if (acquire(KG_GEN_NONE, &conn, &absent) == CKR_OK) release(conn, 1);
}

/* Drops every connection and session. Nothing is sent: in a forked child
 * this only closes the child's copies of the parent's descriptors. */
void kg_transport_close(void)
{
	while (T.conns) {
		struct kg_conn *c = T.conns;
		T.conns = c->next;
		close(c->fd);
		free(c);
	}
	for (size_t i = 0; i < T.nsessions; i++)
		drop_queue(&T.sessions[i]);
	free(T.sessions);
	memset(&T, 0, sizeof(T));
}

uint32_t kg_current_gen(void)
{
	return T.live ? T.gen : KG_GEN_NONE;
}

/* ---- calls ---- */

CK_RV kg_call_begin(struct kg_call *c, enum kg_method m, uint32_t gen)
{
	c->method = m;
	c->rv = acquire(gen, &c->conn, &c->absent);
	if (c->rv != CKR_OK) {
		if (c->has_session) kg_session_remove(c->session);
		return c->rv;
	}
	c->gen = c->conn->gen;
	put_header(c);
	return CKR_OK;
}

/* Exchanges the queued calls' frames and, when `own`, the call's own, in one write on the call's
 * connection, and parses every reply. */
static CK_RV run_batch(struct kg_call *c, struct kg_call *queued, size_t nq, int own, int *clean)
{
	struct kg_call *calls[DEFER_MAX + 1];
	size_t lens[DEFER_MAX + 1] = {0}, n = 0;
	for (size_t i = 0; i < nq; i++)
		calls[n++] = &queued[i];
	if (own) calls[n++] = c;
	CK_RV rv = exchange(c->conn, calls, n, T.max_frame, lens, clean);
	for (size_t i = 0; i < n && rv == CKR_OK; i++)
		rv = kg_parse_reply(calls[i], lens[i]);
	return rv;
}

CK_RV kg_call_run(struct kg_call *c)
{
	struct kg_call queued[DEFER_MAX];
	size_t nq = 0;
	int clean = 1, deferring = c->has_session && T.cfg.defer_init;
	CK_RV rv = CKR_OK;
	if (deferring && defer(c)) {
		release(c->conn, 1);
		c->conn = NULL;
		return c->rv = CKR_OK;
	}
	if (deferring) nq = take_queue(c, queued);
	if (nq && methods[c->method].lock != KG_LOCK_SESSION) {
		/* The daemon orders this call per application, not after the session's requests: those
		 * go first, on their own. */
		rv = run_batch(c, queued, nq, 0, &clean);
		if (rv == CKR_OK) settle(c, queued, nq, 0);
		free_calls(queued, nq);
		nq = 0;
	}
	if (rv == CKR_OK) rv = run_batch(c, queued, nq, 1, &clean);
	int transport_ok = rv == CKR_OK || clean;
	release(c->conn, transport_ok);
	c->conn = NULL;
	if (!transport_ok && c->has_session) kg_session_remove(c->session);
	if (rv != CKR_OK)
		c->rv = rv;
	else if (deferring && (nq || families[c->method]))
		settle(c, queued, nq, 1);
	free_calls(queued, nq);
	return c->rv;
}

void kg_call_end(struct kg_call *c)
{
	if (c->conn) release(c->conn, 1); /* begun, never run: the connection is clean */
	kg_buf_free(&c->req);
	free(c->reply);
	c->reply = NULL;
	c->conn = NULL;
}

/* ---- sessions ---- */

CK_RV kg_session_check(CK_SESSION_HANDLE h, uint32_t *gen)
{
	CK_RV rv = kg_lock();
	if (rv != CKR_OK) return rv;
	struct session *s = find(h);
	if (!s)
		rv = CKR_SESSION_HANDLE_INVALID;
	else if (s->removed) {
		rv = CKR_DEVICE_REMOVED;
		drop_queue(s);
		*s = T.sessions[--T.nsessions];
	}
	*gen = (uint32_t)(h >> 32);
	kg_unlock();
	return rv;
}

CK_SESSION_HANDLE kg_session_register(uint32_t gen, CK_ULONG daemon_handle, CK_SLOT_ID slot)
{
	CK_SESSION_HANDLE h = KG_HANDLE(gen, daemon_handle);
	if (daemon_handle > UINT32_MAX || daemon_handle == 0 || kg_lock()) return CK_INVALID_HANDLE;
	if (T.nsessions == T.cap) {
		size_t cap = T.cap ? 2 * T.cap : 16;
		struct session *s = realloc(T.sessions, cap * sizeof(*s));
		if (!s) {
			kg_unlock();
			return CK_INVALID_HANDLE;
		}
		T.sessions = s;
		T.cap = cap;
	}
	T.sessions[T.nsessions++] = (struct session){.h = h, .slot = slot, .removed = gen != T.gen || !T.live};
	kg_unlock();
	return h;
}

void kg_session_remove(CK_SESSION_HANDLE h)
{
	if (kg_lock()) return;
	struct session *s = find(h);
	if (s) {
		drop_queue(s);
		*s = T.sessions[--T.nsessions];
	}
	kg_unlock();
}

void kg_session_remove_slot(uint32_t gen, CK_SLOT_ID slot)
{
	if (kg_lock()) return;
	for (size_t i = T.nsessions; i-- > 0;)
		if ((uint32_t)(T.sessions[i].h >> 32) == gen && T.sessions[i].slot == slot) {
			drop_queue(&T.sessions[i]);
			T.sessions[i] = T.sessions[--T.nsessions];
		}
	kg_unlock();
}
