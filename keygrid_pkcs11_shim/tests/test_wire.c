/* test_wire.c - codec and marshalling tests against the golden vectors.
 *
 * Usage: test_wire tests/vectors/wire/msgpack.txt
 * For each vector (NAME HEX LITERAL): the bytes decode, render to LITERAL and
 * re-encode to the same bytes; every strict prefix and any trailing byte is
 * rejected. Then the decoder's limits (garbage, lying lengths, depth), the
 * 32-bit length forms, and the marshalling of mechanisms, templates and
 * replies against the named vectors. Built with ASan and UBSan by `make check`.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../keygrid.h"
#include "check.h"

struct vector {
	char name[64];
	uint8_t *bytes;
	size_t len;
	char *literal;
};
static struct vector vectors[256];
static int nvectors;

static const struct vector *named(const char *name)
{
	for (int i = 0; i < nvectors; i++)
		if (!strcmp(vectors[i].name, name)) return &vectors[i];
	fprintf(stderr, "no vector %s\n", name);
	exit(2);
}

static void load(const char *path)
{
	static char line[1 << 20];
	FILE *f = fopen(path, "r");
	if (!f) {
		perror(path);
		exit(2);
	}
	while (fgets(line, sizeof(line), f)) {
		char *hex, *lit;
		line[strcspn(line, "\n")] = 0;
		if (line[0] == '#' || !line[0]) continue;
		if (!(hex = strchr(line, ' ')) || !(lit = strchr(hex + 1, ' '))) exit(2);
		*hex++ = 0;
		*lit++ = 0;
		struct vector *v = &vectors[nvectors++];
		if (strlen(line) >= sizeof(v->name)) exit(2);
		memcpy(v->name, line, strlen(line) + 1);
		v->len = strlen(hex) / 2;
		v->bytes = malloc(v->len + 1);
		for (size_t i = 0; i < v->len; i++)
			sscanf(hex + 2 * i, "%2hhx", &v->bytes[i]);
		v->literal = strdup(lit);
	}
	fclose(f);
}

/* ---- render (the canonical literal) and re-encode one decoded value ---- */

struct text {
	char s[1 << 16];
	size_t n;
};

static void out(struct text *t, const char *s) /* appends, always NUL-terminated */
{
	size_t k = strlen(s);
	if (t->n + k >= sizeof(t->s)) k = sizeof(t->s) - 1 - t->n;
	memcpy(t->s + t->n, s, k);
	t->n += k;
	t->s[t->n] = 0;
}

static int walk(struct kg_reader *r, struct text *t, struct kg_buf *enc)
{
	char tmp[64];
	const uint8_t *p;
	size_t n;
	uint32_t count;
	uint64_t u;
	int64_t s;
	int b;
	switch (kg_peek(r)) {
	case KG_T_NIL:
		kg_get_nil(r);
		kg_put_nil(enc);
		out(t, "None");
		return 0;
	case KG_T_BOOL:
		kg_get_bool(r, &b);
		kg_put_bool(enc, b);
		out(t, b ? "True" : "False");
		return 0;
	case KG_T_UINT:
		if (kg_get_uint(r, &u)) return -1;
		kg_put_uint(enc, u);
		snprintf(tmp, sizeof(tmp), "%llu", (unsigned long long)u);
		out(t, tmp);
		return 0;
	case KG_T_INT:
		if (kg_get_int(r, &s)) return -1;
		kg_put_int(enc, s);
		snprintf(tmp, sizeof(tmp), "%lld", (long long)s);
		out(t, tmp);
		return 0;
	case KG_T_BIN:
		if (kg_get_bin(r, &p, &n)) return -1;
		kg_put_bin(enc, p, n);
		out(t, "b\"");
		for (size_t i = 0; i < n; i++) {
			snprintf(tmp, sizeof(tmp), "\\x%02x", p[i]);
			out(t, tmp);
		}
		out(t, "\"");
		return 0;
	case KG_T_STR:
		if (kg_get_str(r, (const char **)&p, &n)) return -1;
		kg_put_str(enc, (const char *)p, n);
		out(t, "\"");
		for (size_t i = 0; i < n; i++) {
			tmp[0] = (char)p[i];
			tmp[1] = 0;
			out(t, p[i] == '"' ? "\\\"" : p[i] == '\\' ? "\\\\" : tmp);
		}
		out(t, "\"");
		return 0;
	case KG_T_ARRAY:
	case KG_T_MAP: {
		int map = kg_peek(r) == KG_T_MAP;
		if (map ? kg_get_map(r, &count) : kg_get_array(r, &count)) return -1;
		map ? kg_put_map(enc, count) : kg_put_array(enc, count);
		out(t, map ? "{" : "[");
		for (uint32_t i = 0; i < count; i++) {
			if (i) out(t, ", ");
			if (walk(r, t, enc)) return -1;
			if (map) {
				out(t, ": ");
				if (walk(r, t, enc)) return -1;
			}
		}
		out(t, map ? "}" : "]");
		return 0;
	}
	default:
		return -1;
	}
}

static void test_vectors(void)
{
	for (int i = 0; i < nvectors; i++) {
		const struct vector *v = &vectors[i];
		static struct text text;
		struct kg_buf enc = {0};
		struct kg_reader r = {v->bytes, v->len, 0, 0};
		text.n = 0;
		text.s[0] = 0;
		CHECK(kg_check_value(v->bytes, v->len) == 0, "%s: well-formed", v->name);
		CHECK(walk(&r, &text, &enc) == 0 && r.pos == v->len, "%s: decodes", v->name);
		CHECK(!strcmp(text.s, v->literal), "%s: renders %s", v->name, text.s);
		CHECK(enc.len == v->len && !memcmp(enc.data, v->bytes, v->len), "%s: re-encodes to the same bytes",
		      v->name);
		for (size_t cut = 0; cut < v->len; cut++) /* truncated */
			CHECK(kg_check_value(v->bytes, cut) != 0, "%s: prefix of %zu bytes rejected", v->name, cut);
		v->bytes[v->len] = 0xc0; /* trailing byte */
		CHECK(kg_check_value(v->bytes, v->len + 1) != 0, "%s: trailing byte rejected", v->name);
		kg_buf_free(&enc);
	}
}

/* ---- decoder limits ---- */

static void test_rejects(void)
{
	static const struct {
		const char *what;
		uint8_t bytes[16];
		size_t len;
	} bad[] = {
	        {"reserved 0xc1", {0xc1}, 1},
	        {"float32", {0xca, 0, 0, 0, 0}, 5},
	        {"float64", {0xcb, 0, 0, 0, 0, 0, 0, 0, 0}, 9},
	        {"fixext1", {0xd4, 1, 0}, 3},
	        {"ext8", {0xc7, 1, 1, 0}, 4},
	        {"array32 claims 4G elements", {0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0}, 6},
	        {"map32 claims 4G pairs", {0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0, 0xc0}, 7},
	        {"bin32 longer than the data", {0xc6, 0xff, 0xff, 0xff, 0xff, 0x00}, 6},
	        {"str32 longer than the data", {0xdb, 0x7f, 0xff, 0xff, 0xff, 'a'}, 6},
	        {"array16 one short", {0xdc, 0x00, 0x03, 0xc0, 0xc0}, 5},
	        {"map with a missing value", {0x81, 0xc0}, 2},
	        {"empty input", {0}, 0},
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		CHECK(kg_check_value(bad[i].bytes, bad[i].len) != 0, "%s rejected", bad[i].what);

	uint8_t deep[32];
	memset(deep, 0x91, sizeof(deep));
	deep[KG_MAX_DEPTH] = 0xc0;
	CHECK(kg_check_value(deep, KG_MAX_DEPTH + 1) == 0, "nesting of %d accepted", KG_MAX_DEPTH);
	deep[KG_MAX_DEPTH] = 0x91;
	deep[KG_MAX_DEPTH + 1] = 0xc0;
	CHECK(kg_check_value(deep, KG_MAX_DEPTH + 2) != 0, "nesting beyond %d rejected", KG_MAX_DEPTH);

	/* A failed read poisons the reader. */
	uint8_t two[] = {0x01, 0x02};
	struct kg_reader r = {two, 2, 0, 0};
	const uint8_t *p;
	size_t n;
	uint64_t u;
	CHECK(kg_get_bin(&r, &p, &n) != 0 && kg_get_uint(&r, &u) != 0, "reads after a failure fail");
	/* Negative numbers are not unsigned; big unsigned numbers are not int64. */
	uint8_t neg[] = {0xff}, big[] = {0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
	int64_t s;
	r = (struct kg_reader){neg, 1, 0, 0};
	CHECK(kg_get_uint(&r, &u) != 0, "-1 is not a ulong");
	r = (struct kg_reader){big, 9, 0, 0};
	CHECK(kg_get_int(&r, &s) != 0, "2**64-1 is not an int64");
}

static void test_long_forms(void)
{
	size_t n = 70000;
	uint8_t *data = calloc(1, n);
	struct kg_buf b = {0};
	kg_put_bin(&b, data, n);
	kg_put_str(&b, (const char *)data, n);
	kg_put_array(&b, 70000);
	for (size_t i = 0; i < 70000; i++)
		kg_put_nil(&b);
	kg_put_map(&b, 70000);
	for (size_t i = 0; i < 140000; i++)
		kg_put_uint(&b, 1);
	CHECK(!b.failed && b.data[0] == 0xc6 && b.data[1] == 0 && b.data[2] == 1 && b.data[3] == 0x11 &&
	              b.data[4] == 0x70,
	      "bin32 header");
	CHECK(b.data[5 + n] == 0xdb, "str32 header");
	CHECK(b.data[10 + 2 * n] == 0xdd, "array32 header");
	CHECK(b.data[15 + 3 * n] == 0xdf, "map32 header");
	struct kg_reader r = {b.data, b.len, 0, 0};
	for (int i = 0; i < 4; i++)
		CHECK(kg_skip(&r) == 0, "long form %d decodes", i);
	CHECK(r.pos == b.len, "all consumed");
	kg_buf_free(&b);
	free(data);
}

/* ---- marshalling ---- */

static int same(const struct kg_buf *b, const char *name)
{
	const struct vector *v = named(name);
	return b->len == v->len && !memcmp(b->data, v->bytes, v->len);
}

static void check_mech(const char *name, CK_MECHANISM_TYPE type, void *param, CK_ULONG len)
{
	struct kg_buf b = {0};
	CK_MECHANISM m = {type, param, len};
	CHECK(kg_put_mechanism(&b, &m) == CKR_OK && same(&b, name), "%s encodes as the vector", name);
	kg_buf_free(&b);
	if (len > 1 && type != 0x1082) { /* a structured parameter of the wrong size */
		m.ulParameterLen = len - 1;
		CHECK(kg_put_mechanism(&b, &m) == CKR_MECHANISM_PARAM_INVALID, "%s: wrong size rejected", name);
		kg_buf_free(&b);
	}
}

static void test_mechanisms(void)
{
	CK_BYTE iv16[16], zero12[12] = {0}, aad[] = "aad", label[] = "label", pub[] = {4, 1, 2}, ctx[] = "ctx";
	for (int i = 0; i < 16; i++)
		iv16[i] = (CK_BYTE)i;
	CK_GCM_PARAMS gcm = {zero12, 12, 96, aad, 3, 128};
	CK_RSA_PKCS_OAEP_PARAMS oaep = {0x250, 2, 1, label, 5};
	CK_RSA_PKCS_PSS_PARAMS pss = {0x250, 2, 32};
	CK_ECDH1_DERIVE_PARAMS ecdh = {1, 0, NULL, 3, pub};
	CK_AES_CTR_PARAMS ctr = {128, {0}};
	CK_EDDSA_PARAMS eddsa = {CK_TRUE, 3, ctx};
	CK_ULONG mac_len = 16;
	memcpy(ctr.cb, iv16, 16);
	check_mech("mechanism-none", 0x1041, NULL, 0);
	check_mech("mechanism-iv", 0x1082, iv16, 16);
	check_mech("mechanism-gcm", 0x1087, &gcm, sizeof(gcm));
	check_mech("mechanism-oaep", 0x9, &oaep, sizeof(oaep));
	check_mech("mechanism-pss", 0x43, &pss, sizeof(pss));
	check_mech("mechanism-ecdh1", 0x1050, &ecdh, sizeof(ecdh));
	check_mech("mechanism-ctr", 0x1086, &ctr, sizeof(ctr));
	check_mech("mechanism-eddsa", 0x1057, &eddsa, sizeof(eddsa));
	check_mech("mechanism-ulong", 0x252, &mac_len, sizeof(mac_len));

	struct kg_buf b = {0};
	CK_GCM_PARAMS no_iv = {NULL, 12, 96, NULL, 0, 128};
	CK_MECHANISM m = {0x1087, &no_iv, sizeof(no_iv)};
	CHECK(kg_put_mechanism(&b, &m) == CKR_MECHANISM_PARAM_INVALID, "NULL pointer with a length rejected");
	kg_buf_free(&b);
	CHECK(kg_put_mechanism(&b, NULL) == CKR_ARGUMENTS_BAD, "NULL mechanism rejected");
	kg_buf_free(&b);
}

static void test_templates(void)
{
	CK_OBJECT_CLASS cls = 3;
	CK_BBOOL yes = CK_TRUE;
	CK_MECHANISM_TYPE mechs[] = {0x1041, 0x1082};
	CK_KEY_TYPE aes = 0x1f;
	CK_ULONG len32 = 32;
	CK_ATTRIBUTE inner[] = {{0x100, &aes, sizeof(aes)}, {0x161, &len32, sizeof(len32)}};
	CK_BYTE vendor[] = {1, 2};
	CK_ATTRIBUTE t[] = {
	        {0x0, &cls, sizeof(cls)},
	        {0x1, &yes, sizeof(yes)},
	        {0x3, "key", 3},
	        {0x40000600, mechs, sizeof(mechs)},
	        {0x40000211, inner, sizeof(inner)},
	        {0x80000001, vendor, sizeof(vendor)},
	};
	struct kg_buf b = {0};
	CHECK(kg_put_template(&b, t, 6, 0) == CKR_OK && same(&b, "template-kinds"), "template encodes as the vector");
	kg_buf_free(&b);
	t[1].ulValueLen = 4;
	CHECK(kg_put_template(&b, t, 6, 0) == CKR_ATTRIBUTE_VALUE_INVALID, "CK_BBOOL of 4 bytes rejected");
	kg_buf_free(&b);
	t[1].ulValueLen = 1;
	t[0].ulValueLen = 4;
	CHECK(kg_put_template(&b, t, 6, 0) == CKR_ATTRIBUTE_VALUE_INVALID, "CK_ULONG of 4 bytes rejected");
	kg_buf_free(&b);
	t[0].ulValueLen = sizeof(cls);
	t[2].pValue = NULL;
	CHECK(kg_put_template(&b, t, 6, 0) == CKR_ARGUMENTS_BAD, "NULL value with a length rejected");
	kg_buf_free(&b);
	CHECK(kg_put_template(&b, NULL, 1, 0) == CKR_ARGUMENTS_BAD, "NULL template rejected");
	kg_buf_free(&b);
}

/* A reader at the result of a reply vector: [1, id, rv, RESULT, message]. */
static struct kg_reader result_of(const char *name, uint64_t *rv)
{
	const struct vector *v = named(name);
	struct kg_reader r = {v->bytes, v->len, 0, 0};
	uint32_t n;
	uint64_t u;
	kg_get_array(&r, &n);
	kg_get_uint(&r, &u);
	kg_get_uint(&r, &u);
	kg_get_uint(&r, rv);
	return r;
}

static void test_replies(void)
{
	uint64_t rv;
	CK_BYTE label[16], value[16], sign, mechs[16];
	CK_ULONG key_type;
	CK_ATTRIBUTE inner[3];
	CK_ATTRIBUTE t[] = {
	        {0x3, label, sizeof(label)}, {0x11, value, sizeof(value)}, {0x108, &sign, 1},
	        {0x100, &key_type, 8},       {0x40000600, NULL, 0},        {0x40000212, inner, sizeof(inner)},
	};
	memset(inner, 0, sizeof(inner));
	struct kg_reader r = result_of("reply-attributes", &rv);
	CHECK(kg_get_attribute_values(&r, t, 6, (CK_RV)rv) == CKR_ATTRIBUTE_SENSITIVE, "the daemon's code stays");
	CHECK(t[0].ulValueLen == 5 && !memcmp(label, "label", 5), "bytes copied");
	CHECK(t[1].ulValueLen == CK_UNAVAILABLE_INFORMATION, "nil is unavailable");
	CHECK(t[2].ulValueLen == 1 && sign == CK_TRUE, "CK_BBOOL is one byte");
	CHECK(t[3].ulValueLen == sizeof(CK_ULONG) && key_type == 3, "CK_ULONG native");
	CHECK(t[4].ulValueLen == 2 * sizeof(CK_MECHANISM_TYPE), "NULL pValue gives the length");
	CHECK(t[5].ulValueLen == 3 * sizeof(CK_ATTRIBUTE), "nested template length");
	CHECK(inner[0].type == 0 && inner[0].ulValueLen == sizeof(CK_ULONG), "nested types set, lengths given");
	CHECK(inner[2].type == 0x104 && inner[2].ulValueLen == 1, "nested CK_BBOOL length");

	/* Short buffers: unavailable and CKR_BUFFER_TOO_SMALL; nested values filled. */
	CK_ULONG cls = 0, vlen = 0;
	CK_BBOOL verify = CK_TRUE;
	inner[0].pValue = &cls;
	inner[1].pValue = &vlen;
	inner[2].pValue = &verify;
	t[0].ulValueLen = 2;
	t[4].pValue = mechs;
	t[4].ulValueLen = sizeof(mechs);
	r = result_of("reply-attributes", &rv);
	CHECK(kg_get_attribute_values(&r, t, 6, CKR_OK) == CKR_BUFFER_TOO_SMALL, "short buffer reported");
	CHECK(t[0].ulValueLen == CK_UNAVAILABLE_INFORMATION, "short buffer is unavailable");
	CHECK(t[4].ulValueLen == sizeof(mechs), "mechanisms fit exactly");
	CHECK(cls == 4 && vlen == 32 && verify == CK_FALSE, "nested values filled");
	r = result_of("reply-attributes", &rv);
	CHECK(kg_get_attribute_values(&r, t, 5, CKR_OK) == CKR_DEVICE_ERROR, "a count mismatch is a device error");

	CK_BYTE buf[8];
	CK_ULONG len = sizeof(buf);
	r = result_of("reply-out", &rv);
	CHECK(kg_get_out(&r, (CK_RV)rv, buf, &len) == CKR_OK && len == 4 && buf[0] == 0x30, "out copied");
	len = 0;
	r = result_of("reply-out-length", &rv);
	CHECK(kg_get_out(&r, (CK_RV)rv, NULL, &len) == CKR_OK && len == 64, "length answer");
	len = 1;
	r = result_of("reply-buffer-too-small", &rv);
	CHECK(kg_get_out(&r, (CK_RV)rv, buf, &len) == CKR_BUFFER_TOO_SMALL && len == 64, "too small with the length");

	CK_INFO info;
	r = result_of("reply-info", &rv);
	CHECK(kg_get_info(&r, KG_INFO, &info) == CKR_OK, "info decodes");
	CHECK(!memcmp(info.manufacturerID, "KeyGrid                         ", 32), "blank-padded");
	CHECK(info.libraryDescription[0] == ' ' && info.libraryDescription[31] == ' ', "missing string is blanks");
	CHECK(info.cryptokiVersion.major == 2 && info.cryptokiVersion.minor == 40, "version");
	r = result_of("reply-out", &rv);
	CHECK(kg_get_info(&r, KG_INFO, &info) == CKR_DEVICE_ERROR, "not a map: device error");

	CK_UTF8CHAR field[5];
	kg_pad(field, sizeof(field), "\xd0\xba\xd0\xbb\xd1\x8e", 6); /* "клю" into 5 bytes: "кл" + blank */
	CHECK(!memcmp(field, "\xd0\xba\xd0\xbb ", 5), "cut on a character boundary");
	CHECK(kg_attr_kind(0x1) == KG_KIND_BOOL && kg_attr_kind(0x0) == KG_KIND_ULONG &&
	              kg_attr_kind(0x3) == KG_KIND_BYTES,
	      "attribute kinds");
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s VECTORS\n", argv[0]);
		return 2;
	}
	load(argv[1]);
	test_vectors();
	test_rejects();
	test_long_forms();
	test_mechanisms();
	test_templates();
	test_replies();
	for (int i = 0; i < nvectors; i++)
		free(vectors[i].bytes), free(vectors[i].literal);
	printf("test_wire: %d vectors, %d checks, %d failures\n", nvectors, checks, failures);
	return failures != 0;
}
