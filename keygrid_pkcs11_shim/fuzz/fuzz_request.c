/* fuzz_request.c - libFuzzer target: one request frame body on a module worker's lane.
 *
 * The input goes through kg_lane_answer (lanes.c) with a fake module whose
 * functions read every input byte they are given, write every output byte
 * they claim and answer each outlen case (length query, short buffer, a
 * length larger than the first buffer, an error). A reply answered in C must
 * be exactly one well-formed MessagePack value. With KG_FUZZ_SEEDS=DIR set,
 * the initialiser writes a seed request of each shape into DIR.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../keygrid.h"
#include "../lanes.h"

static volatile uint8_t sink;

static void touch(const CK_BYTE *p, CK_ULONG n)
{
	for (CK_ULONG i = 0; i < n; i++)
		sink ^= p[i];
}

/* Writes min(want, *len) bytes or reports want; the first input byte picks the behaviour. */
static CK_RV output(CK_BYTE_PTR data, CK_ULONG data_len, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	CK_ULONG want = data_len ? (CK_ULONG)data[0] * 17 : 1500;
	if (data_len && data[0] == 0xee) return CKR_DATA_LEN_RANGE;
	if (!out) {
		*out_len = want;
		return CKR_OK;
	}
	if (*out_len < want) {
		*out_len = want;
		return CKR_BUFFER_TOO_SMALL;
	}
	memset(out, 0x11, want);
	*out_len = want;
	return CKR_OK;
}

static CK_RV init(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)
{
	if (m->pParameter) touch(m->pParameter, m->ulParameterLen), ((CK_BYTE *)m->pParameter)[0] ^= 1;
	return (s ^ k) & 1 ? CKR_OK : CKR_KEY_HANDLE_INVALID;
}

static CK_RV digest_init(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m)
{
	return init(s, m, 1);
}

static CK_RV out3(CK_SESSION_HANDLE s, CK_BYTE_PTR d, CK_ULONG n, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	(void)s;
	touch(d, n);
	return output(d, n, out, out_len);
}

static CK_RV final(CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	CK_BYTE pick = (CK_BYTE)s;
	return output(&pick, 1, out, out_len);
}

static CK_RV in(CK_SESSION_HANDLE s, CK_BYTE_PTR d, CK_ULONG n)
{
	touch(d, n);
	return s & 1 ? CKR_OK : CKR_SIGNATURE_INVALID;
}

static CK_RV random_bytes(CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG n)
{
	(void)s;
	memset(out, 0x22, n);
	return CKR_OK;
}

static CK_RV verify(CK_SESSION_HANDLE s, CK_BYTE_PTR d, CK_ULONG n, CK_BYTE_PTR sig, CK_ULONG sig_len)
{
	touch(d, n);
	touch(sig, sig_len);
	return s & 1 ? CKR_OK : CKR_SIGNATURE_INVALID;
}

static CK_FUNCTION_LIST fake = {
        .C_EncryptInit = init,
        .C_DecryptInit = init,
        .C_SignInit = init,
        .C_VerifyInit = init,
        .C_DigestInit = digest_init,
        .C_Encrypt = out3,
        .C_EncryptUpdate = out3,
        .C_Decrypt = out3,
        .C_Sign = out3,
        .C_Digest = out3,
        .C_SignEncryptUpdate = out3,
        .C_EncryptFinal = final,
        .C_SignFinal = final,
        .C_DigestFinal = final,
        .C_SignUpdate = in,
        .C_VerifyFinal = in,
        .C_SeedRandom = in,
        .C_GenerateRandom = random_bytes,
        .C_Verify = verify,
};

static int no_fallback(int lane, const uint8_t *body, size_t len, struct kg_reply *out)
{
	(void)lane, (void)body, (void)len, (void)out;
	return -1;
}

static const CK_ULONG POINTERS[] = {CKM_AES_CCM};
static const struct kg_lanes L = {&fake, no_fallback, POINTERS, 1, 1u << 20};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct kg_buf reply = {0};
	if (kg_lane_answer(&L, data, size, &reply) == 0 && kg_check_value(reply.data, reply.len) != 0) abort();
	kg_buf_free(&reply);
	return 0;
}

/* ---- seeds ---- */

static void seed(const char *dir, int n, struct kg_buf *b)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/seed-%02d", dir, n);
	FILE *f = fopen(path, "wb");
	if (f) {
		fwrite(b->data, 1, b->len, f);
		fclose(f);
	}
	kg_buf_free(b);
}

static void head(struct kg_buf *b, const char *method, uint32_t n)
{
	kg_put_array(b, 2);
	kg_put_str(b, method, strlen(method));
	kg_put_array(b, n);
	kg_put_uint(b, 3);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	const char *dir = getenv("KG_FUZZ_SEEDS");
	if (!dir) return 0;
	struct kg_buf b = {0};
	int n = 0;
	head(&b, "C_SignInit", 3);
	kg_put_array(&b, 2), kg_put_uint(&b, CKM_ECDSA), kg_put_nil(&b), kg_put_uint(&b, 4);
	seed(dir, n++, &b);
	head(&b, "C_EncryptInit", 3);
	kg_put_array(&b, 2), kg_put_uint(&b, CKM_AES_CBC), kg_put_bin(&b, "0123456789abcdef", 16), kg_put_uint(&b, 4);
	seed(dir, n++, &b);
	head(&b, "C_DigestInit", 2);
	kg_put_array(&b, 2), kg_put_uint(&b, CKM_SHA256), kg_put_nil(&b);
	seed(dir, n++, &b);
	head(&b, "C_Sign", 3);
	kg_put_bin(&b, "\x05xyz", 4), kg_put_nil(&b);
	seed(dir, n++, &b);
	head(&b, "C_Encrypt", 3);
	kg_put_bin(&b, "\x90xyz", 4), kg_put_int(&b, -1);
	seed(dir, n++, &b);
	head(&b, "C_Digest", 3);
	kg_put_bin(&b, "\x02", 1), kg_put_uint(&b, 16);
	seed(dir, n++, &b);
	head(&b, "C_SignFinal", 2);
	kg_put_nil(&b);
	seed(dir, n++, &b);
	head(&b, "C_SignUpdate", 2);
	kg_put_bin(&b, "part", 4);
	seed(dir, n++, &b);
	head(&b, "C_Verify", 3);
	kg_put_bin(&b, "data", 4), kg_put_bin(&b, "sig", 3);
	seed(dir, n++, &b);
	head(&b, "C_GenerateRandom", 2);
	kg_put_uint(&b, 32);
	seed(dir, n++, &b);
	return 0;
}
