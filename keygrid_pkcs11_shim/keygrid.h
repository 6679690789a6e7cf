/* keygrid.h - the one internal header of libkeygrid-pkcs11.so.
 *
 * The module forwards every PKCS#11 call to keygridd over its Unix socket
 * (docs/protocol.md). It holds no key material and no token semantics:
 *
 *   module.c     entry points, C_Initialize/C_Finalize, locking, fork detection
 *   calls.c      one short stub per C_* function
 *   wire.c       MessagePack encoder and bounds-checked decoder
 *   transport.c  configuration, connection pool, framing, timeouts, reconnect
 *   marshal.c    templates, mechanisms, attribute values, info structs
 *
 * The PKCS#11 types come from the system header (p11-kit's pkcs11.h, v2.40);
 * the few v3.0 types it lacks (PKCS#11 v3.0 Base 5.2 and 5.16, Current
 * Mechanisms 2.3.14) are declared below.
 */
#ifndef KEYGRID_H
#define KEYGRID_H

#include <stddef.h>
#include <stdint.h>

/* The entry points the system header declares are the module's exports. */
#pragma GCC visibility push(default)
#include <p11-kit/pkcs11.h>
#pragma GCC visibility pop

#include "keygrid-calls.h"

#define KG_EXPORT __attribute__((visibility("default")))

/* ---- PKCS#11 v3.0 additions (v3.0 Base 5.2, 5.16; Current Mechanisms 2.3.14) ---- */

#ifndef CKF_INTERFACE_FORK_SAFE
#define CKF_INTERFACE_FORK_SAFE 0x00000001UL
typedef struct CK_INTERFACE {
	CK_CHAR *pInterfaceName;
	CK_VOID_PTR pFunctionList;
	CK_FLAGS flags;
} CK_INTERFACE;
typedef CK_INTERFACE *CK_INTERFACE_PTR;
typedef CK_INTERFACE_PTR *CK_INTERFACE_PTR_PTR;

typedef struct CK_EDDSA_PARAMS {
	CK_BBOOL phFlag;
	CK_ULONG ulContextDataLen;
	CK_BYTE_PTR pContextData;
} CK_EDDSA_PARAMS;
#endif

/* CK_FUNCTION_LIST_3_0: the v2.40 list, then 24 functions in v3.0 order
 * (C_GetInterfaceList ... C_MessageVerifyFinal). */
typedef void (*kg_fn)(void);
typedef struct {
	CK_FUNCTION_LIST v2;
	kg_fn v3[24];
} kg_function_list_3_0;

/* The v3.0 entry points (v3.0 Base 5.4, 5.6, 5.14-5.19). */
#define KG_V3_FN(name, args) KG_EXPORT CK_RV name args;
#define S                    CK_SESSION_HANDLE
#define P                    CK_VOID_PTR, CK_ULONG
KG_V3_FN(C_GetInterfaceList, (CK_INTERFACE_PTR, CK_ULONG_PTR))
KG_V3_FN(C_GetInterface, (CK_UTF8CHAR_PTR, CK_VERSION_PTR, CK_INTERFACE_PTR_PTR, CK_FLAGS))
KG_V3_FN(C_LoginUser, (S, CK_USER_TYPE, CK_UTF8CHAR_PTR, CK_ULONG, CK_UTF8CHAR_PTR, CK_ULONG))
KG_V3_FN(C_SessionCancel, (S, CK_FLAGS))
KG_V3_FN(C_MessageEncryptInit, (S, CK_MECHANISM_PTR, CK_OBJECT_HANDLE))
KG_V3_FN(C_EncryptMessage, (S, P, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR))
KG_V3_FN(C_EncryptMessageBegin, (S, P, CK_BYTE_PTR, CK_ULONG))
KG_V3_FN(C_EncryptMessageNext, (S, P, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR, CK_FLAGS))
KG_V3_FN(C_MessageEncryptFinal, (S))
KG_V3_FN(C_MessageDecryptInit, (S, CK_MECHANISM_PTR, CK_OBJECT_HANDLE))
KG_V3_FN(C_DecryptMessage, (S, P, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR))
KG_V3_FN(C_DecryptMessageBegin, (S, P, CK_BYTE_PTR, CK_ULONG))
KG_V3_FN(C_DecryptMessageNext, (S, P, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR, CK_FLAGS))
KG_V3_FN(C_MessageDecryptFinal, (S))
KG_V3_FN(C_MessageSignInit, (S, CK_MECHANISM_PTR, CK_OBJECT_HANDLE))
KG_V3_FN(C_SignMessage, (S, P, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR))
KG_V3_FN(C_SignMessageBegin, (S, P))
KG_V3_FN(C_SignMessageNext, (S, P, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR))
KG_V3_FN(C_MessageSignFinal, (S))
KG_V3_FN(C_MessageVerifyInit, (S, CK_MECHANISM_PTR, CK_OBJECT_HANDLE))
KG_V3_FN(C_VerifyMessage, (S, P, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG))
KG_V3_FN(C_VerifyMessageBegin, (S, P))
KG_V3_FN(C_VerifyMessageNext, (S, P, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG))
KG_V3_FN(C_MessageVerifyFinal, (S))
#undef S
#undef P

/* ---- wire.c: MessagePack ---- */

struct kg_buf {
	uint8_t *data;
	size_t len, cap;
	int failed; /* an allocation failed: the content is incomplete */
};

void kg_buf_free(struct kg_buf *b);
void kg_put_raw(struct kg_buf *b, const void *p, size_t n); /* bytes as they are */
void kg_put_nil(struct kg_buf *b);
void kg_put_bool(struct kg_buf *b, int v);
void kg_put_uint(struct kg_buf *b, uint64_t v);
void kg_put_int(struct kg_buf *b, int64_t v);
void kg_put_bin(struct kg_buf *b, const void *p, size_t n);
void kg_put_str(struct kg_buf *b, const char *s, size_t n);
void kg_put_array(struct kg_buf *b, uint32_t n);
void kg_put_map(struct kg_buf *b, uint32_t n);

enum kg_type {
	KG_T_NONE,
	KG_T_NIL,
	KG_T_BOOL,
	KG_T_UINT,
	KG_T_INT,
	KG_T_BIN,
	KG_T_STR,
	KG_T_ARRAY,
	KG_T_MAP,
	KG_T_OTHER
};

/* A read cursor over one buffer. Every getter checks the type and the bounds;
 * on failure it returns -1, sets `bad` and later getters fail too. */
struct kg_reader {
	const uint8_t *p;
	size_t len, pos;
	int bad;
};

#define KG_MAX_DEPTH 16

enum kg_type kg_peek(struct kg_reader *r);
int kg_get_nil(struct kg_reader *r);
int kg_get_bool(struct kg_reader *r, int *v);
int kg_get_uint(struct kg_reader *r, uint64_t *v);
int kg_get_int(struct kg_reader *r, int64_t *v);
int kg_get_bin(struct kg_reader *r, const uint8_t **p, size_t *n);
int kg_get_str(struct kg_reader *r, const char **s, size_t *n);
int kg_get_array(struct kg_reader *r, uint32_t *n);
int kg_get_map(struct kg_reader *r, uint32_t *n);
int kg_skip(struct kg_reader *r);
int kg_check_value(const uint8_t *p, size_t len); /* exactly one well-formed value */

/* ---- module.c: state, locking, logging ---- */

int kg_lock(void);
void kg_unlock(void);
void kg_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
extern int kg_debug;
#define KG_DEBUG(...)                              \
	do {                                       \
		if (kg_debug) kg_log(__VA_ARGS__); \
	} while (0)
CK_RV kg_check_live(void); /* initialised in this process */

/* ---- transport.c ---- */

struct kg_config {
	char socket[108];
	int connect_timeout_ms, call_timeout_ms, busy_poll_us, defer_init, debug;
};

void kg_config_load(struct kg_config *cfg);
void kg_transport_init(const struct kg_config *cfg);
void kg_transport_connect(void);
void kg_transport_close(void);

struct kg_conn;

/* One call in flight: the request being built and, after kg_call_run, the
 * reply with the reader positioned at the result. */
struct kg_call {
	enum kg_method method;
	struct kg_conn *conn;
	uint32_t gen, id;
	struct kg_buf req;
	uint8_t *reply;
	struct kg_reader res;
	CK_RV rv;
	int absent;                /* no daemon could be reached */
	CK_SESSION_HANDLE session; /* the application's handle, when the call has one */
	int has_session;
};

#define KG_GEN_NONE 0u
extern const struct kg_method_info kg_methods[];
CK_RV kg_call_begin(struct kg_call *c, enum kg_method m, uint32_t gen);
CK_RV kg_call_run(struct kg_call *c);                /* defer_init: an init may be queued instead (CKR_OK, no reply) */
CK_RV kg_parse_reply(struct kg_call *c, size_t len); /* c->reply holds one frame body */
void kg_call_end(struct kg_call *c);
uint32_t kg_current_gen(void);

/* Session handles given to the application carry the connection generation
 * in their upper half, so a handle never reaches a restarted daemon. */
#define KG_HANDLE(gen, h) (((CK_ULONG)(gen) << 32) | (CK_ULONG)(h))
CK_RV kg_session_check(CK_SESSION_HANDLE h, uint32_t *gen);
CK_SESSION_HANDLE kg_session_register(uint32_t gen, CK_ULONG daemon_handle, CK_SLOT_ID slot);
void kg_session_remove(CK_SESSION_HANDLE h);
void kg_session_remove_slot(uint32_t gen, CK_SLOT_ID slot);

/* ---- frames.c: sockets, frames, busy polling ---- */

int kg_open_socket(const char *path, int timeout_ms);               /* connected fd, or -1 */
CK_RV kg_frame_check(const struct kg_buf *req, uint32_t max_frame); /* a frame the daemon takes */
/* Sends the frames of calls[0..n) in one write and reads a reply for each into calls[i]->reply
 * (length lens[i]), matched by id. `clean`: nothing was sent, the connection stays usable. */
CK_RV kg_exchange(int fd, struct kg_call **calls, size_t n, uint32_t max_frame, size_t *lens, int *clean,
                  int call_timeout_ms, int busy_poll_us);

/* ---- sessions.c: the session table and deferred init queues (under kg_lock) ---- */

#define KG_DEFER_MAX 4                               /* deferred frames per session */
int kg_defer(struct kg_call *c, uint32_t max_frame); /* 1: the init's frame is queued */
size_t kg_take_queue(struct kg_call *c, struct kg_call *out, uint32_t max_frame);
void kg_settle(struct kg_call *c, const struct kg_call *queued, size_t nq, int own);
void kg_free_calls(struct kg_call *calls, size_t n);
void kg_sessions_end_generation(uint32_t gen); /* the caller holds kg_lock */
void kg_sessions_close(void);

/* ---- marshal.c ---- */

int kg_attr_kind(CK_ATTRIBUTE_TYPE type);
CK_RV kg_put_template(struct kg_buf *b, const CK_ATTRIBUTE *t, CK_ULONG n, int depth);
CK_RV kg_put_mechanism(struct kg_buf *b, const CK_MECHANISM *m);
CK_RV kg_get_attribute_values(struct kg_reader *r, CK_ATTRIBUTE *t, CK_ULONG n, CK_RV rv);
CK_RV kg_get_out(struct kg_reader *r, CK_RV rv, CK_BYTE_PTR out, CK_ULONG_PTR out_len);
CK_RV kg_get_bytes(struct kg_reader *r, CK_BYTE_PTR out, CK_ULONG_PTR out_len);
CK_RV kg_get_ulongs(struct kg_reader *r, CK_ULONG *out, CK_ULONG_PTR count, int exact);

enum kg_info { KG_INFO, KG_SLOT_INFO, KG_TOKEN_INFO, KG_SESSION_INFO, KG_MECHANISM_INFO };
CK_RV kg_get_info(struct kg_reader *r, enum kg_info kind, void *out);
void kg_pad(CK_UTF8CHAR *dst, size_t size, const char *src, size_t n);

#endif
