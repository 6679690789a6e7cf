/* signer.h - libkeygrid-signer.so, ECDSA signatures beside keygridd's event loop (signer.c). */
#ifndef KEYGRID_SIGNER_H
#define KEYGRID_SIGNER_H

#include <stddef.h>
#include <stdint.h>

#define KG_EXPORT __attribute__((visibility("default")))

struct kg_signer;
struct kg_key;

/* Starts the signing thread. NULL on failure. */
KG_EXPORT struct kg_signer *kg_signer_new(void);
/* Readable (an eventfd) while finished jobs wait for kg_signer_take. */
KG_EXPORT int kg_signer_fd(struct kg_signer *S);
/* Stops the thread and drops the jobs not taken. */
KG_EXPORT void kg_signer_free(struct kg_signer *S);
/* An EC private key from its PKCS#8 DER, or NULL. */
KG_EXPORT struct kg_key *kg_signer_key(const unsigned char *pkcs8, size_t len);
/* Drops the caller's reference (queued jobs keep theirs). NULL is ignored. */
KG_EXPORT void kg_signer_key_free(struct kg_key *key);
/* Queues the ECDSA signature of in[0..in_len) (a hash value) with r and s of `side` bytes each:
 * 1 queued, 0 the queue is full, -1 bad arguments. */
KG_EXPORT int kg_signer_submit(struct kg_signer *S, uint64_t id, struct kg_key *key, const unsigned char *in,
                               size_t in_len, size_t side);
/* Signs in[0..in_len) at once, on the caller's thread, with a (k^-1, r) pair the thread precomputed for the
 * key's curve (each pair is used once): the length written to out (2 * side bytes), or 0 when no pair is
 * ready (the first call for a curve starts its pool) or the arguments are bad: sign another way. */
KG_EXPORT size_t kg_signer_sign(struct kg_signer *S, struct kg_key *key, const unsigned char *in, size_t in_len,
                                size_t side, unsigned char *out);
/* 1: a finished job (out_len 0 when it failed; out holds 2 * side bytes), 0: none (the fd is drained). */
KG_EXPORT int kg_signer_take(struct kg_signer *S, uint64_t *id, unsigned char *out, size_t *out_len);

#endif
