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
 * - Frames go out and replies come in through frames.c (busy polling there);
 *   the session table and its deferred init queues are sessions.c's. Here,
 *   a call with defer_init either queues its frame (an init) or sends the
 *   session's queued frames with its own in one write; before a call the
 *   daemon orders per application (C_Login, C_Logout, C_InitPIN, C_SetPIN)
 *   the queue goes out on its own first. Message ids are unique in the
 *   process, so a queued frame may go out on another pooled connection.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdatomic.h>
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
	uint32_t gen;
	int busy;
	struct kg_conn *next;
};

static struct {
	struct kg_config cfg;
	struct kg_conn *conns;
	int nconns; /* including connections being opened */
	uint32_t gen, max_frame;
	int live;
	uint8_t app_id[16];
} T;

const struct kg_method_info kg_methods[] = {KG_METHODS_INIT};
static atomic_uint last_id; /* message ids: unique in the process, so a batch can mix connections' frames */

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
			KG_DEBUG("%s: %.*s", kg_methods[c->method].name, (int)mlen, msg);
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
	kg_put_str(b, kg_methods[c->method].name, strlen(kg_methods[c->method].name));
	kg_put_array(b, kg_methods[c->method].nargs);
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
	if ((conn.fd = kg_open_socket(T.cfg.socket, T.cfg.connect_timeout_ms)) < 0) return -1;
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
	if (kg_exchange(conn.fd, &one, 1, HELLO_MAX_FRAME, &len, &clean, T.cfg.call_timeout_ms, 0) == CKR_OK &&
	    kg_parse_reply(&c, len) == CKR_OK && c.rv == CKR_OK && !kg_get_map(&c.res, &n)) {
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
	kg_sessions_end_generation(gen);
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
	kg_sessions_close();
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
	struct kg_call *calls[KG_DEFER_MAX + 1];
	size_t lens[KG_DEFER_MAX + 1] = {0}, n = 0;
	for (size_t i = 0; i < nq; i++)
		calls[n++] = &queued[i];
	if (own) calls[n++] = c;
	CK_RV rv =
	        kg_exchange(c->conn->fd, calls, n, T.max_frame, lens, clean, T.cfg.call_timeout_ms, T.cfg.busy_poll_us);
	for (size_t i = 0; i < n && rv == CKR_OK; i++)
		rv = kg_parse_reply(calls[i], lens[i]);
	return rv;
}

CK_RV kg_call_run(struct kg_call *c)
{
	struct kg_call queued[KG_DEFER_MAX];
	size_t nq = 0;
	int clean = 1, deferring = c->has_session && T.cfg.defer_init;
	CK_RV rv = CKR_OK;
	if (deferring && kg_defer(c, T.max_frame)) {
		release(c->conn, 1);
		c->conn = NULL;
		return c->rv = CKR_OK;
	}
	if (deferring) nq = kg_take_queue(c, queued, T.max_frame);
	if (nq && kg_methods[c->method].lock != KG_LOCK_SESSION) {
		/* The daemon orders this call per application, not after the session's requests: those
		 * go first, on their own. */
		rv = run_batch(c, queued, nq, 0, &clean);
		if (rv == CKR_OK) kg_settle(c, queued, nq, 0);
		kg_free_calls(queued, nq);
		nq = 0;
	}
	if (rv == CKR_OK) rv = run_batch(c, queued, nq, 1, &clean);
	int transport_ok = rv == CKR_OK || clean;
	release(c->conn, transport_ok);
	c->conn = NULL;
	if (!transport_ok && c->has_session) kg_session_remove(c->session);
	if (rv != CKR_OK)
		c->rv = rv;
	else if (deferring)
		kg_settle(c, queued, nq, 1);
	kg_free_calls(queued, nq);
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
