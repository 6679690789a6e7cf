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
 */
#define _GNU_SOURCE
#include <errno.h>
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

struct kg_conn {
	int fd;
	uint32_t gen, next_id;
	int busy;
	struct kg_conn *next;
};

struct session {
	CK_SESSION_HANDLE h;
	CK_SLOT_ID slot;
	int removed;
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

/* Sends the request in c->req and reads one reply frame into c->reply. */
static CK_RV exchange(struct kg_conn *conn, struct kg_call *c, uint32_t max_frame, size_t *len, int *clean)
{
	uint8_t head[4], first[4096];
	int64_t deadline = deadline_in(T.cfg.call_timeout_ms);
	size_t n;
	*clean = 1; /* nothing sent yet: the connection stays usable */
	if (c->req.failed || c->req.len < 5) return CKR_HOST_MEMORY;
	n = c->req.len - 4;
	if (n > max_frame) return CKR_DEVICE_MEMORY; /* the daemon would refuse the frame */
	*clean = 0;
	for (int i = 0; i < 4; i++)
		c->req.data[i] = (uint8_t)(n >> (24 - 8 * i));
	if (send_all(conn->fd, c->req.data, c->req.len, deadline)) return CKR_DEVICE_REMOVED;
	/* The reply cannot be there yet: wait once, then take the header and as much of the body
	 * as has arrived in one read (one request is in flight per connection, so nothing else is). */
	size_t have = 0;
	while (have < sizeof(head)) {
		if (wait_fd(conn->fd, POLLIN, deadline)) return CKR_DEVICE_REMOVED;
		ssize_t k = recv(conn->fd, first + have, sizeof(first) - have, 0);
		if (k > 0)
			have += (size_t)k;
		else if (!(k < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)))
			return CKR_DEVICE_REMOVED; /* EOF or error */
	}
	memcpy(head, first, sizeof(head));
	*len = (size_t)head[0] << 24 | (size_t)head[1] << 16 | (size_t)head[2] << 8 | head[3];
	if (*len == 0 || *len > max_frame || have - sizeof(head) > *len) return CKR_DEVICE_ERROR;
	if (!(c->reply = malloc(*len))) return CKR_HOST_MEMORY;
	memcpy(c->reply, first + sizeof(head), have - sizeof(head));
	size_t got = have - sizeof(head);
	return recv_all(conn->fd, c->reply + got, *len - got, deadline) ? CKR_DEVICE_REMOVED : CKR_OK;
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
static void put_header(struct kg_call *c, struct kg_conn *conn)
{
	struct kg_buf *b = &c->req;
	c->id = conn->next_id++;
	if (!conn->next_id) conn->next_id = 1;
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
	struct kg_conn conn = {.next_id = 1};
	struct kg_call c = {.method = KG_M_hello};
	uint32_t n;
	size_t len;
	int ok = 0, clean;
	static const char *features[] = {"app-join", "outlen"};
	if ((conn.fd = open_socket(T.cfg.socket, T.cfg.connect_timeout_ms)) < 0) return -1;
	put_header(&c, &conn);
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
	if (exchange(&conn, &c, HELLO_MAX_FRAME, &len, &clean) == CKR_OK && kg_parse_reply(&c, len) == CKR_OK &&
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
	for (size_t i = 0; i < T.nsessions; i++)
		if ((uint32_t)(T.sessions[i].h >> 32) == gen) T.sessions[i].removed = 1;
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
			*conn = (struct kg_conn){fd, gen, 1, 1, T.conns};
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
	put_header(c, c->conn);
	return CKR_OK;
}

CK_RV kg_call_run(struct kg_call *c)
{
	size_t len = 0;
	int clean;
	CK_RV rv = exchange(c->conn, c, T.max_frame, &len, &clean);
	if (rv == CKR_OK) rv = kg_parse_reply(c, len);
	int transport_ok = rv == CKR_OK || clean;
	release(c->conn, transport_ok);
	c->conn = NULL;
	if (!transport_ok && c->has_session) kg_session_remove(c->session);
	if (rv != CKR_OK) c->rv = rv;
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

static struct session *find(CK_SESSION_HANDLE h)
{
	for (size_t i = 0; i < T.nsessions; i++)
		if (T.sessions[i].h == h) return &T.sessions[i];
	return NULL;
}

CK_RV kg_session_check(CK_SESSION_HANDLE h, uint32_t *gen)
{
	CK_RV rv = kg_lock();
	if (rv != CKR_OK) return rv;
	struct session *s = find(h);
	if (!s)
		rv = CKR_SESSION_HANDLE_INVALID;
	else if (s->removed) {
		rv = CKR_DEVICE_REMOVED;
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
	T.sessions[T.nsessions++] = (struct session){h, slot, gen != T.gen || !T.live};
	kg_unlock();
	return h;
}

void kg_session_remove(CK_SESSION_HANDLE h)
{
	if (kg_lock()) return;
	struct session *s = find(h);
	if (s) *s = T.sessions[--T.nsessions];
	kg_unlock();
}

void kg_session_remove_slot(uint32_t gen, CK_SLOT_ID slot)
{
	if (kg_lock()) return;
	for (size_t i = T.nsessions; i-- > 0;)
		if ((uint32_t)(T.sessions[i].h >> 32) == gen && T.sessions[i].slot == slot)
			T.sessions[i] = T.sessions[--T.nsessions];
	kg_unlock();
}
