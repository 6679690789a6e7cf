/* test_signer.c - keygridd's ECDSA signing thread (signer.c).
 *
 * Signatures over P-256, P-384 and P-521 keys made from PKCS#8 verify with OpenSSL, r and s padded to
 * the order's length; an input longer than the order is truncated as X9.62 says (the signature verifies
 * over it). The queue refuses a job beyond its length until a finished one is taken; bad arguments and
 * a non-EC key are refused. A key freed while its jobs are queued stays valid for them; jobs still queued
 * when the signer is freed are released. The eventfd is readable while finished jobs wait and drained
 * when none is left. kg_signer_sign signs on the caller's thread with pairs the thread precomputed per
 * curve: each signature verifies and no r comes twice; a curve beyond the pools' number gets none. Built with ASan and UBSan by `make check` (leaks are reported too).
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include "../signer.h"
#include "check.h"

struct pair {
	EVP_PKEY *pkey;
	struct kg_key *key;
	size_t side;
};

static struct pair make_key(const char *curve, size_t side)
{
	struct pair p = {EVP_EC_gen(curve), NULL, side};
	PKCS8_PRIV_KEY_INFO *info = EVP_PKEY2PKCS8(p.pkey);
	unsigned char *der = NULL;
	int len = i2d_PKCS8_PRIV_KEY_INFO(info, &der);
	CHECK(len > 0, "PKCS#8 of %s", curve);
	p.key = kg_signer_key(der, (size_t)len);
	CHECK(p.key != NULL, "kg_signer_key(%s)", curve);
	OPENSSL_free(der);
	PKCS8_PRIV_KEY_INFO_free(info);
	return p;
}

static int verifies(EVP_PKEY *pkey, const unsigned char *in, size_t in_len, const unsigned char *raw, size_t side)
{
	ECDSA_SIG *sig = ECDSA_SIG_new();
	ECDSA_SIG_set0(sig, BN_bin2bn(raw, (int)side, NULL), BN_bin2bn(raw + side, (int)side, NULL));
	unsigned char *der = NULL;
	int der_len = i2d_ECDSA_SIG(sig, &der);
	EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, NULL);
	int ok = ctx && EVP_PKEY_verify_init(ctx) == 1 && EVP_PKEY_verify(ctx, der, (size_t)der_len, in, in_len) == 1;
	EVP_PKEY_CTX_free(ctx);
	OPENSSL_free(der);
	ECDSA_SIG_free(sig);
	return ok;
}

static int readable(int fd, int timeout_ms)
{
	struct pollfd p = {.fd = fd, .events = POLLIN};
	return poll(&p, 1, timeout_ms) == 1;
}

/* Takes one finished job, waiting for the eventfd when none is ready. */
static int take(struct kg_signer *S, uint64_t *id, unsigned char *out, size_t *out_len)
{
	for (int tries = 0; tries < 100; tries++) {
		if (kg_signer_take(S, id, out, out_len)) return 1;
		readable(kg_signer_fd(S), 100);
	}
	return 0;
}

static void test_curves(void)
{
	static const struct {
		const char *name;
		size_t side;
	} curves[] = {{"P-256", 32}, {"P-384", 48}, {"P-521", 66}};
	struct kg_signer *S = kg_signer_new();
	CHECK(S != NULL, "kg_signer_new");
	for (size_t c = 0; c < sizeof curves / sizeof curves[0]; c++) {
		struct pair p = make_key(curves[c].name, curves[c].side);
		unsigned char in[80];
		for (size_t i = 0; i < sizeof in; i++)
			in[i] = (unsigned char)(i * 7 + c);
		size_t lens[] = {1, 20, p.side, sizeof in}; /* shorter, equal to and longer than the order */
		for (size_t k = 0; k < 4; k++)
			CHECK(kg_signer_submit(S, 100 * c + k, p.key, in, lens[k], p.side) == 1, "submit %zu", k);
		for (size_t k = 0; k < 4; k++) {
			uint64_t id = 0;
			unsigned char out[132];
			size_t out_len = 0;
			CHECK(take(S, &id, out, &out_len), "%s: job %zu finished", curves[c].name, k);
			CHECK(id == 100 * c + k, "jobs finish in order: %llu", (unsigned long long)id);
			CHECK(out_len == 2 * p.side, "%s: r || s is %zu bytes, not %zu", curves[c].name, 2 * p.side,
			      out_len);
			CHECK(verifies(p.pkey, in, lens[k], out, p.side), "%s: signature over %zu bytes verifies",
			      curves[c].name, lens[k]);
			out[0] ^= 1;
			CHECK(!verifies(p.pkey, in, lens[k], out, p.side), "%s: a changed signature fails",
			      curves[c].name);
		}
		kg_signer_key_free(p.key);
		EVP_PKEY_free(p.pkey);
	}
	uint64_t id;
	unsigned char out[132];
	size_t out_len;
	CHECK(kg_signer_take(S, &id, out, &out_len) == 0, "nothing left to take");
	CHECK(!readable(kg_signer_fd(S), 0), "the eventfd is drained when nothing is left");
	kg_signer_free(S);
}

static void test_refusals(void)
{
	struct kg_signer *S = kg_signer_new();
	struct pair p = make_key("P-256", 32);
	unsigned char in[1025] = {1};
	CHECK(kg_signer_submit(S, 1, NULL, in, 32, 32) == -1, "no key");
	CHECK(kg_signer_submit(S, 1, p.key, in, sizeof in, 32) == -1, "input longer than 1024 bytes");
	CHECK(kg_signer_submit(S, 1, p.key, in, 32, 0) == -1, "side 0");
	CHECK(kg_signer_submit(S, 1, p.key, in, 32, 67) == -1, "side beyond P-521's");
	CHECK(kg_signer_key(in, 0) == NULL, "empty PKCS#8");
	CHECK(kg_signer_key(in, 100) == NULL, "garbage PKCS#8");
	CHECK(kg_signer_key(NULL, 10) == NULL, "NULL PKCS#8");
	EVP_PKEY *ed = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
	PKCS8_PRIV_KEY_INFO *info = EVP_PKEY2PKCS8(ed);
	unsigned char *der = NULL;
	int len = i2d_PKCS8_PRIV_KEY_INFO(info, &der);
	CHECK(kg_signer_key(der, (size_t)len) == NULL, "an Ed25519 key is refused");
	OPENSSL_free(der);
	PKCS8_PRIV_KEY_INFO_free(info);
	EVP_PKEY_free(ed);
	kg_signer_key_free(NULL);

	/* The queue holds 64 jobs until they are taken, finished or not. */
	int queued = 0;
	while (queued < 100 && kg_signer_submit(S, (uint64_t)queued, p.key, in, 32, 32) == 1)
		queued++;
	CHECK(queued == 64, "the queue took %d jobs", queued);
	uint64_t id;
	unsigned char out[132];
	size_t out_len;
	CHECK(take(S, &id, out, &out_len) && id == 0, "the first job is taken");
	CHECK(kg_signer_submit(S, 64, p.key, in, 32, 32) == 1, "a taken job makes room");
	CHECK(kg_signer_submit(S, 65, p.key, in, 32, 32) == 0, "and only one");
	/* The caller's reference goes while its jobs are queued: they still sign with it. */
	kg_signer_key_free(p.key);
	for (int n = 1; n <= 64; n++) {
		CHECK(take(S, &id, out, &out_len), "job %d finished", n);
		CHECK(out_len == 64 && verifies(p.pkey, in, 32, out, 32), "job %d signed with the freed key", n);
	}
	EVP_PKEY_free(p.pkey);
	kg_signer_free(S);
}

static void test_free_with_jobs(void)
{
	struct kg_signer *S = kg_signer_new();
	struct pair p = make_key("P-521", 66);
	unsigned char in[64] = {2};
	for (int n = 0; n < 64; n++)
		CHECK(kg_signer_submit(S, (uint64_t)n, p.key, in, sizeof in, 66) == 1, "submit %d", n);
	kg_signer_key_free(p.key);
	kg_signer_free(S); /* queued and finished jobs are released with their key references: no leak */
	EVP_PKEY_free(p.pkey);
}

/* kg_signer_sign: the first call for a curve starts its pool and answers 0; once the thread has filled
 * it, each signature verifies and uses its own pair (no r twice). */
static void test_precomputed(void)
{
	static const struct {
		const char *name;
		size_t side;
	} curves[] = {{"P-256", 32}, {"P-384", 48}, {"P-521", 66}, {"secp256k1", 32}};
	struct kg_signer *S = kg_signer_new();
	unsigned char in[80] = {3}, out[132];
	CHECK(kg_signer_sign(S, NULL, in, 32, 32, out) == 0, "no key");
	for (size_t c = 0; c < sizeof curves / sizeof curves[0]; c++) {
		struct pair p = make_key(curves[c].name, curves[c].side);
		CHECK(kg_signer_sign(S, p.key, in, 0, p.side, out) == 0, "empty input");
		CHECK(kg_signer_sign(S, p.key, in, 32, 0, out) == 0, "side 0");
		size_t first = kg_signer_sign(S, p.key, in, 32, p.side, out); /* starts the pool */
		unsigned char seen[200][66];
		int n = 0;
		for (int tries = 0; n < 200 && tries < 20000; tries++) {
			size_t len = 1 + (size_t)tries % sizeof in;
			in[len - 1] ^= (unsigned char)tries;
			size_t got = kg_signer_sign(S, p.key, in, len, p.side, out);
			if (!got) {
				usleep(1000); /* the pool is being filled */
				continue;
			}
			CHECK(got == 2 * p.side, "%s: r || s length %zu", curves[c].name, got);
			CHECK(verifies(p.pkey, in, len, out, p.side), "%s: precomputed signature %d verifies",
			      curves[c].name, n);
			for (int k = 0; k < n; k++)
				CHECK(memcmp(seen[k], out, p.side) != 0, "%s: r of signature %d repeats signature %d's",
				      curves[c].name, n, k);
			memcpy(seen[n++], out, p.side);
		}
		CHECK(n == 200, "%s: %d precomputed signatures (first call: %zu)", curves[c].name, n, first);
		kg_signer_key_free(p.key);
		EVP_PKEY_free(p.pkey);
	}
	struct pair extra = make_key("P-224", 28); /* a fifth curve: no pool entry left */
	for (int tries = 0; tries < 50; tries++)
		CHECK(kg_signer_sign(S, extra.key, in, 28, 28, out) == 0, "no pool for a fifth curve");
	kg_signer_key_free(extra.key);
	EVP_PKEY_free(extra.pkey);
	kg_signer_free(S); /* the filled pools are freed: no leak */
}

int main(void)
{
	test_curves();
	test_refusals();
	test_free_with_jobs();
	test_precomputed();
	printf("test_signer: %d checks, %d failures\n", checks, failures);
	return failures ? 1 : 0;
}
