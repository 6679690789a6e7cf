/* fuzz_reply.c - libFuzzer target: one reply frame body from the daemon.
 *
 * The input goes through kg_parse_reply (the path every reply takes), then
 * through every result decoder the stubs use, with caller buffers of several
 * sizes: out results, bytes, ulong lists, the five info structures and
 * C_GetAttributeValue with every attribute kind, nested templates included.
 * Seeds: the golden vectors (make fuzz-short writes one file per vector).
 */
#include <stdlib.h>
#include <string.h>

#include "../keygrid.h"

static void results(const struct kg_reader *res, CK_RV rv)
{
	struct kg_reader r;
	CK_BYTE buf[16];
	CK_ULONG len, list[4];
	union {
		CK_INFO info;
		CK_SLOT_INFO slot;
		CK_TOKEN_INFO token;
		CK_SESSION_INFO session;
		CK_MECHANISM_INFO mechanism;
	} info;

	r = *res, len = sizeof(buf);
	kg_get_out(&r, rv, buf, &len);
	r = *res, len = 0;
	kg_get_out(&r, rv, NULL, &len);
	r = *res, len = 3;
	kg_get_bytes(&r, buf, &len);
	r = *res, len = 4;
	kg_get_ulongs(&r, list, &len, 0);
	r = *res, len = 2;
	kg_get_ulongs(&r, list, &len, 1);
	for (int k = KG_INFO; k <= KG_MECHANISM_INFO; k++) {
		r = *res;
		kg_get_info(&r, (enum kg_info)k, &info);
	}

	/* C_GetAttributeValue: as many attributes as the result claims (at most 8). */
	static const CK_ATTRIBUTE_TYPE types[] = {0x3, 0x1, 0x0, 0x40000600, 0x40000211, 0x80000001, 0x11, 0x40000212};
	CK_BYTE bytes[8][8], inner_bytes[4][8];
	CK_ATTRIBUTE t[8], inner[4];
	uint32_t n;
	r = *res;
	if (kg_get_array(&r, &n) || n > 8) return;
	for (int pass = 0; pass < 2; pass++) {
		for (uint32_t i = 0; i < n; i++) {
			int nested = types[i] == 0x40000211 || types[i] == 0x40000212;
			t[i] = (CK_ATTRIBUTE){types[i], pass ? (nested ? (void *)inner : bytes[i]) : NULL,
			                      nested ? sizeof(inner) : (CK_ULONG)(i % 3 ? 8 : 1)};
		}
		for (int j = 0; j < 4; j++)
			inner[j] = (CK_ATTRIBUTE){0, pass ? inner_bytes[j] : NULL, 8};
		r = *res;
		kg_get_attribute_values(&r, t, n, rv);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct kg_call c = {0};
	struct kg_reader pre = {data, size, 0, 0};
	uint32_t n;
	uint64_t kind, id = 0;
	kg_skip(&pre); /* the raw decoder, before any well-formedness check */
	pre = (struct kg_reader){data, size, 0, 0};
	if (!kg_get_array(&pre, &n) && !kg_get_uint(&pre, &kind)) kg_get_uint(&pre, &id);
	c.id = (uint32_t)id; /* let the id check pass so the result decoders run */
	if (!size || !(c.reply = malloc(size))) return 0;
	memcpy(c.reply, data, size);
	if (kg_parse_reply(&c, size) == CKR_OK) results(&c.res, c.rv);
	free(c.reply);
	return 0;
}
