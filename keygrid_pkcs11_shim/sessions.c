/* sessions.c - the application's sessions and their deferred init queues.
 *
 * Rules:
 * - Session handles carry their generation (KG_HANDLE). Sessions of an ended
 *   generation answer CKR_DEVICE_REMOVED once, then CKR_SESSION_HANDLE_INVALID.
 * - Deferred init (defer_init = 1): C_EncryptInit, C_DecryptInit,
 *   C_DigestInit, C_SignInit, C_VerifyInit, C_FindObjectsInit and
 *   C_FindObjectsFinal return CKR_OK once their local checks pass; their
 *   frame waits in the session's queue (at most KG_DEFER_MAX) and goes out in
 *   one write with the session's next call (transport.c). A failed deferred
 *   init is remembered for its family and returned by the next call of that
 *   family that reaches the daemon, in place of that call's own result; a new
 *   init of the family forgets it. Sessions that go away free their queue
 *   unsent.
 * - Everything here runs under the module lock (kg_lock), never across I/O.
 */
#include <stdlib.h>
#include <string.h>

#include "keygrid.h"

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
	struct deferred q[KG_DEFER_MAX];
	CK_RV failed[FAMILIES]; /* a deferred init's code, until a call of its family reports it */
};

static struct {
	struct session *sessions;
	size_t n, cap;
} S;

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
	for (size_t i = 0; i < S.n; i++)
		if (S.sessions[i].h == h) return &S.sessions[i];
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
int kg_defer(struct kg_call *c, uint32_t max_frame)
{
	int queued = 0;
	if (!(is_init(c->method) || c->method == KG_M_C_FindObjectsFinal) || kg_lock()) return 0;
	struct session *s = find(c->session);
	if (s && !s->removed && s->nq < KG_DEFER_MAX && kg_frame_check(&c->req, max_frame) == CKR_OK) {
		s->q[s->nq++] = (struct deferred){c->req, c->id, c->method};
		c->req = (struct kg_buf){0};
		if (is_init(c->method)) s->failed[family_index(c->method)] = CKR_OK; /* forget the last init's */
		queued = 1;
	}
	kg_unlock();
	if (queued) KG_DEBUG("%s: deferred", kg_methods[c->method].name);
	return queued;
}

/* Takes the session's deferred frames as calls of their own, to be sent with or before `c`.
 * C_CloseSession takes none: they go with the session. Neither does a call whose own frame
 * cannot be sent: it fails alone and the queue waits. */
size_t kg_take_queue(struct kg_call *c, struct kg_call *out, uint32_t max_frame)
{
	size_t n = 0;
	if (c->method == KG_M_C_CloseSession || kg_lock()) return 0;
	struct session *s = find(c->session);
	if (s && !s->removed && kg_frame_check(&c->req, max_frame) == CKR_OK) {
		for (; n < s->nq; n++)
			out[n] = (struct kg_call){.method = s->q[n].method, .id = s->q[n].id, .req = s->q[n].req};
		s->nq = 0;
	}
	kg_unlock();
	return n;
}

void kg_free_calls(struct kg_call *calls, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		kg_buf_free(&calls[i].req);
		free(calls[i].reply);
	}
}

/* After a batch's replies: remembers each deferred init's code for its family (CKR_OK forgets),
 * then, when `own`, gives a call of a family with a remembered failure that code instead of its
 * own. A deferred C_FindObjectsFinal's failure is only logged. */
void kg_settle(struct kg_call *c, const struct kg_call *queued, size_t nq, int own)
{
	if (!nq && !families[c->method]) return; /* nothing queued, nothing to report */
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
		KG_DEBUG("%s: reports a deferred init's CK_RV 0x%lx", kg_methods[c->method].name, report);
		c->rv = report;
	}
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
		*s = S.sessions[--S.n];
	}
	*gen = (uint32_t)(h >> 32);
	kg_unlock();
	return rv;
}

CK_SESSION_HANDLE kg_session_register(uint32_t gen, CK_ULONG daemon_handle, CK_SLOT_ID slot)
{
	CK_SESSION_HANDLE h = KG_HANDLE(gen, daemon_handle);
	if (daemon_handle > UINT32_MAX || daemon_handle == 0 || kg_lock()) return CK_INVALID_HANDLE;
	if (S.n == S.cap) {
		size_t cap = S.cap ? 2 * S.cap : 16;
		struct session *s = realloc(S.sessions, cap * sizeof(*s));
		if (!s) {
			kg_unlock();
			return CK_INVALID_HANDLE;
		}
		S.sessions = s;
		S.cap = cap;
	}
	S.sessions[S.n++] = (struct session){.h = h, .slot = slot, .removed = gen != kg_current_gen()};
	kg_unlock();
	return h;
}

void kg_session_remove(CK_SESSION_HANDLE h)
{
	if (kg_lock()) return;
	struct session *s = find(h);
	if (s) {
		drop_queue(s);
		*s = S.sessions[--S.n];
	}
	kg_unlock();
}

void kg_session_remove_slot(uint32_t gen, CK_SLOT_ID slot)
{
	if (kg_lock()) return;
	for (size_t i = S.n; i-- > 0;)
		if ((uint32_t)(S.sessions[i].h >> 32) == gen && S.sessions[i].slot == slot) {
			drop_queue(&S.sessions[i]);
			S.sessions[i] = S.sessions[--S.n];
		}
	kg_unlock();
}

/* Sessions of generation `gen` become removed (the caller holds the module lock). */
void kg_sessions_end_generation(uint32_t gen)
{
	for (size_t i = 0; i < S.n; i++) {
		if ((uint32_t)(S.sessions[i].h >> 32) != gen) continue;
		S.sessions[i].removed = 1;
		drop_queue(&S.sessions[i]);
	}
}

/* Forgets every session, sending nothing (C_Finalize, a forked child). */
void kg_sessions_close(void)
{
	for (size_t i = 0; i < S.n; i++)
		drop_queue(&S.sessions[i]);
	free(S.sessions);
	memset(&S, 0, sizeof(S));
}
