/* lanes.h - libkeygrid-worker.so, the module worker's lanes in C (lanes.c). */
#ifndef KEYGRID_LANES_H
#define KEYGRID_LANES_H

#include <stddef.h>
#include <stdint.h>

#include "keygrid.h"

/* The reply frame a fallback gives, set with kg_reply_set(). */
struct kg_reply;

/* Answers one request the C side does not serve: calls kg_reply_set() with the whole reply frame (header
 * included) and returns 0, or returns -1 to end the lane. Called from the lane's thread. */
typedef int (*kg_lane_fallback)(int lane, const uint8_t *body, size_t len, struct kg_reply *out);

KG_EXPORT void kg_reply_set(struct kg_reply *out, const uint8_t *frame, size_t len);

/* Serves lanes fds[0..n) (lane i from a thread of its own, lane 0 from the caller's) until every one has
 * ended, closing each fd as it ends. pointer_params: mechanisms whose byte-string parameter holds pointers
 * (left to the fallback). max_frame: the longest request body taken. Returns 0, or -1 for bad arguments. */
KG_EXPORT int kg_lanes_serve(const int *fds, int n, CK_FUNCTION_LIST *fl, kg_lane_fallback fallback,
                             const CK_ULONG *pointer_params, size_t n_pointer_params, uint32_t max_frame);

/* What a lane serves with; for the tests and the fuzzer, kg_lane_answer on it. */
struct kg_lanes {
	CK_FUNCTION_LIST *fl;
	kg_lane_fallback fallback;
	const CK_ULONG *pointer_params;
	size_t n_pointer_params;
	uint32_t max_frame;
};

/* Appends the reply body to request `body` when the call is served in C and returns 0; -1: the fallback's
 * (the module was not called); KG_LANE_LOST: the module was called but the reply could not be built (no
 * memory), so the call must not be answered again: the lane ends and the daemon fails the call. */
#define KG_LANE_LOST (-2)
int kg_lane_answer(const struct kg_lanes *L, const uint8_t *body, size_t len, struct kg_buf *b);

#endif
