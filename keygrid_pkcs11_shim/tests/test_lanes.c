/* test_lanes.c - the module worker's C lanes (lanes.c) against a fake module.
 *
 * kg_lane_answer: each shape of call answered in C gives the reply bytes the
 * worker's Python writes for it (results, the module's CK_RV, the outlen
 * rules with the retry and CKR_BUFFER_TOO_SMALL, a length query); requests it
 * must leave to Python (another method, wrong types, a structured or
 * pointer-holding parameter, a function the module lacks, trailing bytes)
 * answer -1. kg_lanes_serve: two lanes over socket pairs, fast and fallback
 * requests in order, a frame too long ends its lane, EOF ends the call.
 * Built with ASan and UBSan by `make check`.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../keygrid.h"
#include "../lanes.h"
#include "check.h"

/* ---- the fake module ---- */

static CK_MECHANISM last_mech;
static CK_BYTE last_param[16];

static CK_RV sign_init(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE key)
{
	(void)s;
	last_mech = *m;
	if (m->pParameter && m->ulParameterLen <= sizeof last_param)
		memcpy(last_param, m->pParameter, m->ulParameterLen);
	return key == 99 ? CKR_KEY_HANDLE_INVALID : CKR_OK;
}

/* The signature of data is data reversed. */
static CK_RV sign(CK_SESSION_HANDLE s, CK_BYTE_PTR data, CK_ULONG len, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	(void)s;
	if (!out) {
		*out_len = len;
		return CKR_OK;
	}
	if (*out_len < len) {
		*out_len = len;
		return CKR_BUFFER_TOO_SMALL;
	}
	for (CK_ULONG i = 0; i < len; i++)
		out[i] = data[len - 1 - i];
	*out_len = len;
	return CKR_OK;
}

/* 2000 bytes of 0x5a: more than the first buffer (1024) of a final call. */
static CK_RV sign_final(CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	(void)s;
	if (!out || *out_len < 2000) {
		*out_len = 2000;
		return out ? CKR_BUFFER_TOO_SMALL : CKR_OK;
	}
	memset(out, 0x5a, 2000);
	*out_len = 2000;
	return CKR_OK;
}

static CK_RV random_bytes(CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG len)
{
	(void)s;
	memset(out, 0xab, len);
	return CKR_OK;
}

static CK_RV verify(CK_SESSION_HANDLE s, CK_BYTE_PTR data, CK_ULONG len, CK_BYTE_PTR sig, CK_ULONG sig_len)
{
	(void)s;
	return len == sig_len && !memcmp(data, sig, len) ? CKR_OK : CKR_SIGNATURE_INVALID;
}

static CK_FUNCTION_LIST fake = {
        .C_SignInit = sign_init,
        .C_Sign = sign,
        .C_SignFinal = sign_final,
        .C_GenerateRandom = random_bytes,
        .C_Verify = verify,
};

static const CK_ULONG POINTERS[] = {CKM_AES_CCM};

/* ---- helpers ---- */

static int fallback_calls;

static int fallback(int lane, const uint8_t *body, size_t len, struct kg_reply *out)
{
	(void)body, (void)len;
	__atomic_add_fetch(&fallback_calls, 1, __ATOMIC_SEQ_CST);
	uint8_t frame[] = {0, 0, 0, 3, 0x92, 0x00, (uint8_t)lane}; /* [0, lane] */
	kg_reply_set(out, frame, sizeof frame);
	return 0;
}

static const struct kg_lanes L = {&fake, fallback, POINTERS, 1, 1u << 20};

static void request_head(struct kg_buf *b, const char *method, uint32_t nargs)
{
	kg_put_array(b, 2);
	kg_put_str(b, method, strlen(method));
	kg_put_array(b, nargs);
}

/* kg_lane_answer on req must give exactly want (or -1 when want is NULL). */
static void expect(const char *what, struct kg_buf *req, struct kg_buf *want)
{
	struct kg_buf got = {0};
	int rc = kg_lane_answer(&L, req->data, req->len, &got);
	if (!want) {
		CHECK(rc == -1, "%s: answered in C, expected the fallback", what);
	} else {
		CHECK(rc == 0, "%s: left to the fallback", what);
		CHECK(rc != 0 || (got.len == want->len && !memcmp(got.data, want->data, got.len)), "%s: reply differs",
		      what);
	}
	kg_buf_free(&got);
	kg_buf_free(req);
	if (want) kg_buf_free(want);
}

static void rv_reply(struct kg_buf *b, CK_RV rv, const char *message)
{
	kg_put_array(b, 3);
	kg_put_uint(b, rv);
	kg_put_nil(b);
	kg_put_str(b, message, strlen(message));
}

static void ok_nil(struct kg_buf *b)
{
	kg_put_array(b, 2);
	kg_put_uint(b, 0);
	kg_put_nil(b);
}

/* ---- kg_lane_answer ---- */

static void test_init(void)
{
	struct kg_buf req = {0}, want = {0};
	request_head(&req, "C_SignInit", 3);
	kg_put_uint(&req, 1);
	kg_put_array(&req, 2);
	kg_put_uint(&req, CKM_ECDSA);
	kg_put_nil(&req);
	kg_put_uint(&req, 5);
	ok_nil(&want);
	expect("C_SignInit, no parameter", &req, &want);
	CHECK(last_mech.mechanism == CKM_ECDSA && !last_mech.pParameter && !last_mech.ulParameterLen, "mechanism");

	request_head(&req, "C_SignInit", 3);
	kg_put_uint(&req, 1);
	kg_put_array(&req, 2);
	kg_put_uint(&req, CKM_AES_CBC);
	kg_put_bin(&req, "0123456789abcdef", 16);
	kg_put_uint(&req, 99);
	rv_reply(&want, CKR_KEY_HANDLE_INVALID, "C_SignInit: the module's answer");
	expect("C_SignInit, the module's CK_RV", &req, &want);
	CHECK(last_mech.ulParameterLen == 16 && !memcmp(last_param, "0123456789abcdef", 16), "a byte-string parameter");

	request_head(&req, "C_SignInit", 3);
	kg_put_uint(&req, 1);
	kg_put_array(&req, 2);
	kg_put_uint(&req, CKM_AES_CBC);
	kg_put_bin(&req, "", 0);
	kg_put_uint(&req, 5);
	ok_nil(&want);
	expect("C_SignInit, an empty parameter", &req, &want);
	CHECK(!last_mech.pParameter && !last_mech.ulParameterLen, "an empty parameter is NULL_PTR");

	request_head(&req, "C_SignInit", 3);
	kg_put_uint(&req, 1);
	kg_put_array(&req, 2);
	kg_put_uint(&req, CKM_RSA_PKCS_PSS);
	kg_put_array(&req, 4);
	kg_put_uint(&req, 2), kg_put_uint(&req, CKM_SHA256), kg_put_uint(&req, 2), kg_put_uint(&req, 32);
	kg_put_uint(&req, 5);
	expect("C_SignInit, a structured parameter", &req, NULL);

	request_head(&req, "C_SignInit", 3);
	kg_put_uint(&req, 1);
	kg_put_array(&req, 2);
	kg_put_uint(&req, CKM_AES_CCM);
	kg_put_bin(&req, "12345678", 8);
	kg_put_uint(&req, 5);
	expect("C_SignInit, a parameter that holds pointers", &req, NULL);

	request_head(&req, "C_EncryptInit", 3);
	kg_put_uint(&req, 1);
	kg_put_array(&req, 2);
	kg_put_uint(&req, CKM_AES_ECB);
	kg_put_nil(&req);
	kg_put_uint(&req, 5);
	expect("C_EncryptInit, NULL in the function list", &req, NULL);
}

static void sign_request(struct kg_buf *req, const char *data, struct kg_buf *outlen)
{
	request_head(req, "C_Sign", 3);
	kg_put_uint(req, 7);
	kg_put_bin(req, data, strlen(data));
	kg_put_raw(req, outlen->data, outlen->len);
	kg_buf_free(outlen);
}

static void test_out(void)
{
	struct kg_buf req = {0}, want = {0}, outlen = {0};

	kg_put_nil(&outlen);
	sign_request(&req, "abc", &outlen);
	kg_put_array(&want, 2);
	kg_put_uint(&want, 0);
	kg_put_array(&want, 2);
	kg_put_bin(&want, "cba", 3);
	kg_put_uint(&want, 3);
	expect("C_Sign, no limit", &req, &want);

	kg_put_int(&outlen, -1);
	sign_request(&req, "abcd", &outlen);
	kg_put_array(&want, 2);
	kg_put_uint(&want, 0);
	kg_put_array(&want, 2);
	kg_put_nil(&want);
	kg_put_uint(&want, 4);
	expect("C_Sign, a length query", &req, &want);

	kg_put_uint(&outlen, 2);
	sign_request(&req, "abc", &outlen);
	kg_put_array(&want, 3);
	kg_put_uint(&want, CKR_BUFFER_TOO_SMALL);
	kg_put_array(&want, 2);
	kg_put_nil(&want);
	kg_put_uint(&want, 3);
	kg_put_str(&want, "C_Sign", 6);
	expect("C_Sign, a buffer too small", &req, &want);

	kg_put_uint(&outlen, 3);
	sign_request(&req, "xyz", &outlen);
	kg_put_array(&want, 2);
	kg_put_uint(&want, 0);
	kg_put_array(&want, 2);
	kg_put_bin(&want, "zyx", 3);
	kg_put_uint(&want, 3);
	expect("C_Sign, an exact buffer", &req, &want);

	kg_put_int(&outlen, -2);
	sign_request(&req, "abc", &outlen);
	expect("C_Sign, outlen -2", &req, NULL);

	uint8_t big[2000];
	memset(big, 0x5a, sizeof big);
	request_head(&req, "C_SignFinal", 2);
	kg_put_uint(&req, 7);
	kg_put_nil(&req);
	kg_put_array(&want, 2);
	kg_put_uint(&want, 0);
	kg_put_array(&want, 2);
	kg_put_bin(&want, big, sizeof big);
	kg_put_uint(&want, sizeof big);
	expect("C_SignFinal, the retry at the module's length", &req, &want);

	request_head(&req, "C_SignFinal", 2);
	kg_put_uint(&req, 7);
	kg_put_uint(&req, 1500);
	kg_put_array(&want, 3);
	kg_put_uint(&want, CKR_BUFFER_TOO_SMALL);
	kg_put_array(&want, 2);
	kg_put_nil(&want);
	kg_put_uint(&want, 2000);
	kg_put_str(&want, "C_SignFinal", 11);
	expect("C_SignFinal, the caller's buffer too small", &req, &want);
}

static void test_other_shapes(void)
{
	struct kg_buf req = {0}, want = {0};
	uint8_t ab[16];
	memset(ab, 0xab, sizeof ab);

	request_head(&req, "C_GenerateRandom", 2);
	kg_put_uint(&req, 7);
	kg_put_uint(&req, 16);
	kg_put_array(&want, 2);
	kg_put_uint(&want, 0);
	kg_put_bin(&want, ab, sizeof ab);
	expect("C_GenerateRandom", &req, &want);

	request_head(&req, "C_GenerateRandom", 2);
	kg_put_uint(&req, 7);
	kg_put_uint(&req, (uint64_t)1 << 40);
	expect("C_GenerateRandom above the buffer limit", &req, NULL);

	request_head(&req, "C_Verify", 3);
	kg_put_uint(&req, 7);
	kg_put_bin(&req, "sig", 3);
	kg_put_bin(&req, "sig", 3);
	ok_nil(&want);
	expect("C_Verify, valid", &req, &want);

	request_head(&req, "C_Verify", 3);
	kg_put_uint(&req, 7);
	kg_put_bin(&req, "sig", 3);
	kg_put_bin(&req, "bad", 3);
	rv_reply(&want, CKR_SIGNATURE_INVALID, "C_Verify: the module's answer");
	expect("C_Verify, invalid", &req, &want);
}

static void test_left_to_python(void)
{
	struct kg_buf req = {0};

	request_head(&req, "C_Login", 3);
	kg_put_uint(&req, 7), kg_put_uint(&req, 1), kg_put_bin(&req, "1234", 4);
	expect("another method", &req, NULL);

	request_head(&req, "C_Verify", 3);
	kg_put_str(&req, "7", 1), kg_put_bin(&req, "a", 1), kg_put_bin(&req, "a", 1);
	expect("a session that is a string", &req, NULL);

	request_head(&req, "C_Verify", 2);
	kg_put_uint(&req, 7), kg_put_bin(&req, "a", 1);
	expect("an argument missing", &req, NULL);

	request_head(&req, "C_Verify", 3);
	kg_put_uint(&req, 7), kg_put_str(&req, "a", 1), kg_put_bin(&req, "a", 1);
	expect("data that is a string", &req, NULL);

	request_head(&req, "C_Verify", 3);
	kg_put_uint(&req, 7), kg_put_bin(&req, "a", 1), kg_put_bin(&req, "a", 1);
	kg_put_nil(&req);
	expect("a byte after the request", &req, NULL);

	static const uint8_t garbage[] = {0x92, 0xa6, 'C', '_', 'S', 'i', 'g', 'n', 0x93, 0x07, 0xc4, 0xff};
	kg_put_raw(&req, garbage, sizeof garbage);
	expect("a length past the end", &req, NULL);
}

/* ---- kg_lanes_serve ---- */

struct served {
	int fds[2];
	int rc;
};

static void *run_lanes(void *arg)
{
	struct served *s = arg;
	s->rc = kg_lanes_serve(s->fds, 2, &fake, fallback, POINTERS, 1, 64);
	return NULL;
}

static void send_frame(int fd, struct kg_buf *body)
{
	uint8_t h[4] = {(uint8_t)(body->len >> 24), (uint8_t)(body->len >> 16), (uint8_t)(body->len >> 8),
	                (uint8_t)body->len};
	CHECK(write(fd, h, 4) == 4 && write(fd, body->data, body->len) == (ssize_t)body->len, "send");
	kg_buf_free(body);
}

static size_t read_reply(int fd, uint8_t *out, size_t cap)
{
	uint8_t h[4];
	size_t got = 0;
	while (got < 4) {
		ssize_t n = read(fd, h + got, 4 - got);
		if (n <= 0) return 0;
		got += (size_t)n;
	}
	size_t len = (size_t)h[0] << 24 | (size_t)h[1] << 16 | (size_t)h[2] << 8 | h[3];
	if (len > cap) return 0;
	for (got = 0; got < len;) {
		ssize_t n = read(fd, out + got, len - got);
		if (n <= 0) return 0;
		got += (size_t)n;
	}
	return len;
}

static void test_serve(void)
{
	int a[2], b[2];
	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, a) == 0 && socketpair(AF_UNIX, SOCK_STREAM, 0, b) == 0, "pairs");
	struct served s = {{a[1], b[1]}, -2};
	pthread_t t;
	pthread_create(&t, NULL, run_lanes, &s);
	fallback_calls = 0;

	struct kg_buf req = {0};
	request_head(&req, "C_GenerateRandom", 2);
	kg_put_uint(&req, 7), kg_put_uint(&req, 4);
	send_frame(a[0], &req);
	request_head(&req, "C_Login", 0);
	send_frame(a[0], &req);
	request_head(&req, "C_Login", 0);
	send_frame(b[0], &req);

	uint8_t reply[256];
	static const uint8_t random4[] = {0x92, 0x00, 0xc4, 4, 0xab, 0xab, 0xab, 0xab};
	size_t n = read_reply(a[0], reply, sizeof reply);
	CHECK(n == sizeof random4 && !memcmp(reply, random4, n), "lane 0: the random bytes first");
	n = read_reply(a[0], reply, sizeof reply);
	CHECK(n == 3 && reply[2] == 0, "lane 0: then the fallback's reply, from lane 0");
	n = read_reply(b[0], reply, sizeof reply);
	CHECK(n == 3 && reply[2] == 1, "lane 1: the fallback's reply, from lane 1");
	CHECK(fallback_calls == 2, "two fallback calls, not %d", fallback_calls);

	uint8_t too_long[4] = {0, 0, 1, 0}; /* 256 > max_frame 64 */
	CHECK(write(b[0], too_long, 4) == 4, "send");
	CHECK(read_reply(b[0], reply, sizeof reply) == 0, "a frame too long ends the lane");
	close(b[0]);
	close(a[0]);
	pthread_join(t, NULL);
	CHECK(s.rc == 0, "kg_lanes_serve returns 0 when every lane has ended, not %d", s.rc);
	CHECK(kg_lanes_serve(s.fds, 0, &fake, fallback, NULL, 0, 64) == -1, "no lanes");
}

int main(void)
{
	test_init();
	test_out();
	test_other_shapes();
	test_left_to_python();
	test_serve();
	printf("test_lanes: %d checks, %d failures\n", checks, failures);
	return failures != 0;
}
