/* signer.c - libkeygrid-signer.so: ECDSA signatures on a thread of keygridd's own, beside its event loop.
 *
 * keygridd is one Python process: its loop serves every client on one core. When several clients sign
 * at once, the loop hands the ECDSA computations to this thread (which never takes the interpreter's
 * lock) and serves other requests meanwhile; it learns of finished signatures through an eventfd in
 * its epoll set. The signature comes out as PKCS#11 wants it, r || s, each the curve order's length.
 *
 * Calls from the loop: kg_signer_sign (sign at once with a precomputed nonce, if one is ready),
 * kg_signer_submit (queue a job; never blocks on the computation) and kg_signer_take (a finished job, if
 * any). Keys are made from PKCS#8 by kg_signer_key; a queued job holds a reference of its own, so a key
 * freed meanwhile stays valid until its jobs end.
 *
 * While no job waits, the thread fills a pool of (k^-1, r) pairs per curve (ECDSA_sign_setup, k from
 * OpenSSL's private DRBG); kg_signer_sign takes one pair out under the lock, so no pair signs twice, and
 * finishes the signature with ECDSA_do_sign_ex. A curve's pool starts with its first kg_signer_sign.
 * The thread sleeps on a condition variable when it has no job and no pool to fill: polling for the next
 * job would take the core the clients' threads run on (measured: fewer signatures for any polling time).
 */
#define _GNU_SOURCE
/* ECDSA_sign_setup and ECDSA_do_sign_ex (precomputed k^-1 and r) and the EC_KEY they take are deprecated
 * since OpenSSL 3.0 and have no EVP equivalent; Debian's libcrypto 3 has them. */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <stdatomic.h>
#include <pthread.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <openssl/ec.h>
#include <openssl/ecdsa.h>
#include <openssl/objects.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include "signer.h"

#define QUEUE          64   /* jobs in the queue at most (submitted and not yet taken) */
#define POOL           128  /* precomputed (k^-1, r) pairs kept per curve */
#define CURVES         4    /* curves with a pool */
#define SIGN_INPUT_MAX 1024 /* CKM_ECDSA input bytes: a hash value */
#define SIDE_MAX       66   /* P-521's order length */

/* An EC private key: made and released from the loop, used by the thread. ctx (made on first use) is the
 * thread's only; the last reference, the loop's or a finished job's, frees both. */
struct kg_key {
	EVP_PKEY *pkey;
	EVP_PKEY_CTX *ctx;
	const EC_KEY *ec; /* pkey's, for kg_signer_sign (the loop's thread) */
	int nid;          /* its curve */
	atomic_int refs;
};

/* Precomputed (k^-1, r) pairs of one curve: the thread fills the pool while it has no job, a signature on
 * the loop takes one pair out (under the lock) and uses it once. */
struct pool {
	int nid;           /* 0: a free entry */
	EC_KEY *nonce_key; /* a throwaway key of the curve: ECDSA_sign_setup wants one (k does not depend on it) */
	int n;
	BIGNUM *kinv[POOL], *r[POOL];
};

struct job {
	uint64_t id;
	struct kg_key *key;
	size_t side;
	size_t in_len;
	size_t out_len; /* 0: the signature failed */
	unsigned char in[SIGN_INPUT_MAX];
	unsigned char out[2 * SIDE_MAX];
};

struct kg_signer {
	pthread_mutex_t lock;
	pthread_cond_t wake;
	pthread_t thread;
	int efd;
	int stop;
	int sleeping;
	struct pool pools[CURVES];
	/* Jobs i with taken <= i < done are finished, done <= i < queued wait; indices modulo QUEUE. */
	uint64_t taken, done, queued;
	struct job jobs[QUEUE];
};

static void key_release(struct kg_key *k)
{
	if (atomic_fetch_sub(&k->refs, 1) == 1) {
		EVP_PKEY_CTX_free(k->ctx);
		EVP_PKEY_free(k->pkey);
		free(k);
	}
}

/* r || s of an ECDSA signature into out (2 * side bytes). */
static size_t raw_of(const ECDSA_SIG *sig, size_t side, unsigned char *out)
{
	const BIGNUM *r, *s;
	ECDSA_SIG_get0(sig, &r, &s);
	if (BN_bn2binpad(r, out, (int)side) != (int)side || BN_bn2binpad(s, out + side, (int)side) != (int)side)
		return 0;
	return 2 * side;
}

static size_t sign_raw(struct kg_key *k, size_t side, const unsigned char *in, size_t in_len, unsigned char *out)
{
	unsigned char der[2 * SIDE_MAX + 16];
	size_t der_len = sizeof der;
	size_t written = 0;
	if (!k->ctx) {
		k->ctx = EVP_PKEY_CTX_new(k->pkey, NULL);
		if (k->ctx && EVP_PKEY_sign_init(k->ctx) != 1) {
			EVP_PKEY_CTX_free(k->ctx);
			k->ctx = NULL;
		}
		if (!k->ctx) return 0;
	}
	if (EVP_PKEY_sign(k->ctx, der, &der_len, in, in_len) == 1) {
		const unsigned char *p = der;
		ECDSA_SIG *sig = d2i_ECDSA_SIG(NULL, &p, (long)der_len);
		if (sig) {
			written = raw_of(sig, side, out);
			ECDSA_SIG_free(sig);
		}
	}
	OPENSSL_cleanse(der, sizeof der);
	return written;
}

/* A pool short of pairs, with the lock held; NULL when all are full. */
static struct pool *pool_to_fill(struct kg_signer *S)
{
	for (int i = 0; i < CURVES; i++)
		if (S->pools[i].nid && S->pools[i].n < POOL) return &S->pools[i];
	return NULL;
}

/* Adds one pair to pool p: computed without the lock (the pool's entry and key stay until kg_signer_free). */
static void fill_one(struct kg_signer *S, struct pool *p)
{
	BIGNUM *kinv = NULL, *r = NULL;
	pthread_mutex_unlock(&S->lock);
	if (!p->nonce_key) {
		EC_KEY *k = EC_KEY_new_by_curve_name(p->nid);
		if (k && !EC_KEY_generate_key(k)) {
			EC_KEY_free(k);
			k = NULL;
		}
		p->nonce_key = k; /* only this thread reads or sets it */
	}
	int ok = p->nonce_key && ECDSA_sign_setup(p->nonce_key, NULL, &kinv, &r) == 1;
	pthread_mutex_lock(&S->lock);
	if (ok && p->n < POOL) {
		p->kinv[p->n] = kinv;
		p->r[p->n] = r;
		p->n++;
		return;
	}
	BN_clear_free(kinv);
	BN_clear_free(r);
	if (!ok) p->nid = 0; /* a curve the precomputation cannot serve: its signatures go the usual way */
}

static void *run(void *arg)
{
	struct kg_signer *S = arg;
	pthread_mutex_lock(&S->lock);
	for (;;) {
		struct pool *p = NULL;
		while (S->done == S->queued && !S->stop && !(p = pool_to_fill(S))) {
			S->sleeping = 1;
			pthread_cond_wait(&S->wake, &S->lock);
			S->sleeping = 0;
		}
		if (S->stop) break;
		if (S->done == S->queued) { /* no job waits: precompute */
			fill_one(S, p);
			continue;
		}
		struct job *j = &S->jobs[S->done % QUEUE];
		pthread_mutex_unlock(&S->lock);
		j->out_len = sign_raw(j->key, j->side, j->in, j->in_len, j->out);
		OPENSSL_cleanse(j->in, j->in_len);
		key_release(j->key);
		j->key = NULL;
		pthread_mutex_lock(&S->lock);
		int first = S->taken == S->done;
		S->done++;
		if (first) {
			pthread_mutex_unlock(&S->lock);
			uint64_t one = 1;
			ssize_t n = write(S->efd, &one, sizeof one);
			(void)n; /* a full counter is still readable */
			pthread_mutex_lock(&S->lock);
		}
	}
	pthread_mutex_unlock(&S->lock);
	return NULL;
}

KG_EXPORT struct kg_signer *kg_signer_new(void)
{
	struct kg_signer *S = calloc(1, sizeof *S);
	if (!S) return NULL;
	S->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (S->efd < 0) {
		free(S);
		return NULL;
	}
	pthread_mutex_init(&S->lock, NULL);
	pthread_cond_init(&S->wake, NULL);
	if (pthread_create(&S->thread, NULL, run, S) != 0) {
		close(S->efd);
		free(S);
		return NULL;
	}
	return S;
}

KG_EXPORT int kg_signer_fd(struct kg_signer *S)
{
	return S->efd;
}

KG_EXPORT void kg_signer_free(struct kg_signer *S)
{
	if (!S) return;
	pthread_mutex_lock(&S->lock);
	S->stop = 1;
	pthread_cond_signal(&S->wake);
	pthread_mutex_unlock(&S->lock);
	pthread_join(S->thread, NULL);
	for (uint64_t i = S->done; i < S->queued; i++)
		key_release(S->jobs[i % QUEUE].key);
	for (int i = 0; i < CURVES; i++) {
		struct pool *p = &S->pools[i];
		for (int k = 0; k < p->n; k++) {
			BN_clear_free(p->kinv[k]);
			BN_clear_free(p->r[k]);
		}
		EC_KEY_free(p->nonce_key);
	}
	OPENSSL_cleanse(S->jobs, sizeof S->jobs);
	close(S->efd);
	pthread_mutex_destroy(&S->lock);
	pthread_cond_destroy(&S->wake);
	free(S);
}

KG_EXPORT struct kg_key *kg_signer_key(const unsigned char *pkcs8, size_t len)
{
	if (!pkcs8 || len > LONG_MAX) return NULL;
	const unsigned char *p = pkcs8;
	PKCS8_PRIV_KEY_INFO *info = d2i_PKCS8_PRIV_KEY_INFO(NULL, &p, (long)len);
	if (!info) return NULL;
	EVP_PKEY *pkey = EVP_PKCS82PKEY(info);
	PKCS8_PRIV_KEY_INFO_free(info);
	if (!pkey) return NULL;
	struct kg_key *k = EVP_PKEY_get_base_id(pkey) == EVP_PKEY_EC ? calloc(1, sizeof *k) : NULL;
	if (!k) {
		EVP_PKEY_free(pkey);
		return NULL;
	}
	k->pkey = pkey;
	k->ec = EVP_PKEY_get0_EC_KEY(pkey);
	k->nid = k->ec ? EC_GROUP_get_curve_name(EC_KEY_get0_group(k->ec)) : NID_undef;
	atomic_init(&k->refs, 1);
	return k;
}

KG_EXPORT void kg_signer_key_free(struct kg_key *key)
{
	if (key) key_release(key);
}

KG_EXPORT size_t kg_signer_sign(struct kg_signer *S, struct kg_key *key, const unsigned char *in, size_t in_len,
                                size_t side, unsigned char *out)
{
	if (!key || !key->ec || key->nid == NID_undef || in_len == 0 || in_len > SIGN_INPUT_MAX || side == 0 ||
	    side > SIDE_MAX)
		return 0;
	BIGNUM *kinv = NULL, *r = NULL;
	struct pool *p = NULL, *free_entry = NULL;
	pthread_mutex_lock(&S->lock);
	for (int i = 0; i < CURVES && !p; i++) {
		if (S->pools[i].nid == key->nid)
			p = &S->pools[i];
		else if (!S->pools[i].nid && !S->pools[i].nonce_key && !free_entry)
			free_entry = &S->pools[i];
	}
	if (!p && free_entry && !S->stop) {
		free_entry->nid = key->nid; /* the thread fills it from now on */
		p = free_entry;
	}
	if (p && p->n > 0) {
		p->n--;
		kinv = p->kinv[p->n];
		r = p->r[p->n];
		p->kinv[p->n] = p->r[p->n] = NULL; /* each pair is used once */
	}
	int wake = p && p->n < POOL / 2 && S->sleeping;
	pthread_mutex_unlock(&S->lock);
	if (wake) pthread_cond_signal(&S->wake);
	if (!kinv) return 0;
	size_t written = 0;
	ECDSA_SIG *sig = ECDSA_do_sign_ex(in, (int)in_len, kinv, r, (EC_KEY *)key->ec);
	if (sig) {
		written = raw_of(sig, side, out);
		ECDSA_SIG_free(sig);
	}
	BN_clear_free(kinv);
	BN_clear_free(r);
	return written;
}

KG_EXPORT int kg_signer_submit(struct kg_signer *S, uint64_t id, struct kg_key *key, const unsigned char *in,
                               size_t in_len, size_t side)
{
	if (!key || in_len > SIGN_INPUT_MAX || side == 0 || side > SIDE_MAX) return -1;
	pthread_mutex_lock(&S->lock);
	if (S->queued - S->taken >= QUEUE || S->stop) {
		pthread_mutex_unlock(&S->lock);
		return 0;
	}
	struct job *j = &S->jobs[S->queued % QUEUE];
	atomic_fetch_add(&key->refs, 1);
	j->id = id;
	j->key = key;
	j->side = side;
	j->in_len = in_len;
	memcpy(j->in, in, in_len);
	S->queued++;
	int wake = S->sleeping;
	pthread_mutex_unlock(&S->lock);
	if (wake) /* after the unlock: the thread does not wake only to wait for the lock */
		pthread_cond_signal(&S->wake);
	return 1;
}

KG_EXPORT int kg_signer_take(struct kg_signer *S, uint64_t *id, unsigned char *out, size_t *out_len)
{
	pthread_mutex_lock(&S->lock);
	if (S->taken == S->done) {
		uint64_t count;
		ssize_t n = read(S->efd, &count, sizeof count); /* drained: the next finished job writes again */
		(void)n;
		pthread_mutex_unlock(&S->lock);
		return 0;
	}
	struct job *j = &S->jobs[S->taken % QUEUE];
	*id = j->id;
	*out_len = j->out_len;
	memcpy(out, j->out, j->out_len);
	OPENSSL_cleanse(j->out, sizeof j->out);
	S->taken++;
	pthread_mutex_unlock(&S->lock);
	return 1;
}
