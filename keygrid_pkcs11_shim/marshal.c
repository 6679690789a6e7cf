/* marshal.c - C structures <-> wire values.
 *
 * Templates and attribute values are typed by the attribute kind table and
 * mechanism parameters by the parameter type table (keygrid-calls.h,
 * generated from the Python tables; docs/protocol.md). Rules:
 * - A structured parameter (CK_GCM_PARAMS, ...) must have ulParameterLen ==
 *   sizeof(struct), else CKR_MECHANISM_PARAM_INVALID; only the fields the spec
 *   defines are read. Any other parameter travels as raw bytes, none as nil.
 * - C_GetAttributeValue (v2.40 Base 5.7): per attribute, pValue NULL gives the
 *   length; a short buffer gives CK_UNAVAILABLE_INFORMATION and
 *   CKR_BUFFER_TOO_SMALL; a nil value gives CK_UNAVAILABLE_INFORMATION.
 *   Attribute arrays (CKA_WRAP_TEMPLATE, ...) fill the caller's CK_ATTRIBUTE
 *   array by the same rules, recursively.
 * - Info strings are unpadded UTF-8 on the wire: blank-padded here and cut on
 *   a character boundary (v2.40 Base 3.2).
 * Every reply value is read through the bounds-checked reader; a value of the
 * wrong type is CKR_DEVICE_ERROR.
 */
#include <stdlib.h>
#include <string.h>

#include "keygrid.h"

static const struct kg_attr_kind attr_kinds[] = {KG_ATTR_KINDS_INIT};
static const struct kg_mech_param mech_params[] = {KG_MECH_PARAMS_INIT};
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static int cmp_ulong(const void *key, const void *entry) /* both tables start with an unsigned long */
{
	unsigned long a = *(const unsigned long *)key, b = *(const unsigned long *)entry;
	return a < b ? -1 : a > b;
}

int kg_attr_kind(CK_ATTRIBUTE_TYPE type)
{
	const struct kg_attr_kind *k = bsearch(&type, attr_kinds, COUNT(attr_kinds), sizeof(*k), cmp_ulong);
	return k ? k->kind : KG_KIND_BYTES;
}

static int param_type(CK_MECHANISM_TYPE mech)
{
	const struct kg_mech_param *p = bsearch(&mech, mech_params, COUNT(mech_params), sizeof(*p), cmp_ulong);
	return p ? p->ptype : 0;
}

/* ---- requests ---- */

CK_RV kg_put_template(struct kg_buf *b, const CK_ATTRIBUTE *t, CK_ULONG n, int depth)
{
	if ((n && !t) || n > UINT32_MAX) return CKR_ARGUMENTS_BAD;
	kg_put_array(b, (uint32_t)n);
	for (CK_ULONG i = 0; i < n; i++) {
		const void *v = t[i].pValue;
		CK_ULONG len = t[i].ulValueLen, u;
		if (!v && len) return CKR_ARGUMENTS_BAD;
		kg_put_array(b, 2);
		kg_put_uint(b, t[i].type);
		switch (kg_attr_kind(t[i].type)) {
		case KG_KIND_BOOL:
			if (len != sizeof(CK_BBOOL)) return CKR_ATTRIBUTE_VALUE_INVALID;
			kg_put_bool(b, *(const CK_BBOOL *)v != CK_FALSE);
			break;
		case KG_KIND_ULONG:
			if (len != sizeof(CK_ULONG)) return CKR_ATTRIBUTE_VALUE_INVALID;
			memcpy(&u, v, sizeof(u));
			kg_put_uint(b, u);
			break;
		case KG_KIND_MECHANISMS:
			if (len % sizeof(CK_MECHANISM_TYPE) || len / sizeof(CK_MECHANISM_TYPE) > UINT32_MAX)
				return CKR_ATTRIBUTE_VALUE_INVALID;
			kg_put_array(b, (uint32_t)(len / sizeof(CK_MECHANISM_TYPE)));
			for (CK_ULONG j = 0; j < len / sizeof(CK_MECHANISM_TYPE); j++) {
				memcpy(&u, (const CK_BYTE *)v + j * sizeof(u), sizeof(u));
				kg_put_uint(b, u);
			}
			break;
		case KG_KIND_TEMPLATE: {
			CK_RV rv = CKR_ATTRIBUTE_VALUE_INVALID;
			if (depth < 2 && len % sizeof(CK_ATTRIBUTE) == 0)
				rv = kg_put_template(b, v, len / sizeof(CK_ATTRIBUTE), depth + 1);
			if (rv != CKR_OK) return rv == CKR_ARGUMENTS_BAD ? rv : CKR_ATTRIBUTE_VALUE_INVALID;
			break;
		}
		default:
			kg_put_bin(b, v, len);
		}
	}
	return CKR_OK;
}

/* A pointer/length pair of a parameter structure as bin. */
static int put_field(struct kg_buf *b, const void *p, CK_ULONG n)
{
	if (!p && n) return -1;
	kg_put_bin(b, p, n);
	return 0;
}

CK_RV kg_put_mechanism(struct kg_buf *b, const CK_MECHANISM *m)
{
	const void *p;
	CK_ULONG len;
	int bad = 0;
	if (!m) return CKR_ARGUMENTS_BAD;
	p = m->pParameter;
	len = m->ulParameterLen;
	kg_put_array(b, 2);
	kg_put_uint(b, m->mechanism);
	if (!p || !len) {
		kg_put_nil(b); /* no parameter */
		return !p && len ? CKR_MECHANISM_PARAM_INVALID : CKR_OK;
	}
#define AS(type) (len == sizeof(type) ? (const type *)p : NULL)
	switch (param_type(m->mechanism)) {
	case KG_PARAM_GCM: {
		const CK_GCM_PARAMS *g = AS(CK_GCM_PARAMS);
		if (!g) return CKR_MECHANISM_PARAM_INVALID;
		kg_put_array(b, 5);
		kg_put_uint(b, KG_PARAM_GCM);
		bad |= put_field(b, g->pIv, g->ulIvLen);
		kg_put_uint(b, g->ulIvBits);
		bad |= put_field(b, g->pAAD, g->ulAADLen);
		kg_put_uint(b, g->ulTagBits);
		break;
	}
	case KG_PARAM_OAEP: {
		const CK_RSA_PKCS_OAEP_PARAMS *o = AS(CK_RSA_PKCS_OAEP_PARAMS);
		if (!o) return CKR_MECHANISM_PARAM_INVALID;
		kg_put_array(b, 5);
		kg_put_uint(b, KG_PARAM_OAEP);
		kg_put_uint(b, o->hashAlg);
		kg_put_uint(b, o->mgf);
		kg_put_uint(b, o->source);
		bad |= put_field(b, o->pSourceData, o->ulSourceDataLen);
		break;
	}
	case KG_PARAM_PSS: {
		const CK_RSA_PKCS_PSS_PARAMS *s = AS(CK_RSA_PKCS_PSS_PARAMS);
		if (!s) return CKR_MECHANISM_PARAM_INVALID;
		kg_put_array(b, 4);
		kg_put_uint(b, KG_PARAM_PSS);
		kg_put_uint(b, s->hashAlg);
		kg_put_uint(b, s->mgf);
		kg_put_uint(b, s->sLen);
		break;
	}
	case KG_PARAM_ECDH1: {
		const CK_ECDH1_DERIVE_PARAMS *e = AS(CK_ECDH1_DERIVE_PARAMS);
		if (!e) return CKR_MECHANISM_PARAM_INVALID;
		kg_put_array(b, 4);
		kg_put_uint(b, KG_PARAM_ECDH1);
		kg_put_uint(b, e->kdf);
		bad |= put_field(b, e->pSharedData, e->ulSharedDataLen);
		bad |= put_field(b, e->pPublicData, e->ulPublicDataLen);
		break;
	}
	case KG_PARAM_CTR: {
		const CK_AES_CTR_PARAMS *c = AS(CK_AES_CTR_PARAMS);
		if (!c) return CKR_MECHANISM_PARAM_INVALID;
		kg_put_array(b, 3);
		kg_put_uint(b, KG_PARAM_CTR);
		kg_put_uint(b, c->ulCounterBits);
		kg_put_bin(b, c->cb, sizeof(c->cb));
		break;
	}
	case KG_PARAM_EDDSA: {
		const CK_EDDSA_PARAMS *e = AS(CK_EDDSA_PARAMS);
		if (!e) return CKR_MECHANISM_PARAM_INVALID;
		kg_put_array(b, 3);
		kg_put_uint(b, KG_PARAM_EDDSA);
		kg_put_bool(b, e->phFlag != CK_FALSE);
		bad |= put_field(b, e->pContextData, e->ulContextDataLen);
		break;
	}
	case KG_PARAM_ULONG: {
		const CK_ULONG *u = AS(CK_ULONG);
		if (!u) return CKR_MECHANISM_PARAM_INVALID;
		kg_put_array(b, 2);
		kg_put_uint(b, KG_PARAM_ULONG);
		kg_put_uint(b, *u);
		break;
	}
	default:
		kg_put_bin(b, p, len); /* IVs and parameters without pointers */
	}
#undef AS
	return bad ? CKR_MECHANISM_PARAM_INVALID : CKR_OK;
}

/* ---- replies ---- */

/* Places `size` bytes of a value by the C_GetAttributeValue rules. */
static CK_RV place(CK_ATTRIBUTE *a, const void *src, CK_ULONG size)
{
	if (!a->pValue) {
		a->ulValueLen = size;
		return CKR_OK;
	}
	if (a->ulValueLen < size) {
		a->ulValueLen = CK_UNAVAILABLE_INFORMATION;
		return CKR_BUFFER_TOO_SMALL;
	}
	if (size) memcpy(a->pValue, src, size);
	a->ulValueLen = size;
	return CKR_OK;
}

static CK_RV get_value(struct kg_reader *r, CK_ATTRIBUTE *a, int depth)
{
	const uint8_t *p;
	size_t n;
	uint32_t count, pair;
	uint64_t u;
	int flag;
	CK_RV rv = CKR_OK;
	if (kg_peek(r) == KG_T_NIL) {
		kg_get_nil(r);
		a->ulValueLen = CK_UNAVAILABLE_INFORMATION;
		return CKR_OK;
	}
	switch (kg_attr_kind(a->type)) {
	case KG_KIND_BOOL: {
		if (kg_get_bool(r, &flag)) return CKR_DEVICE_ERROR;
		CK_BBOOL v = flag ? CK_TRUE : CK_FALSE;
		return place(a, &v, sizeof(v));
	}
	case KG_KIND_ULONG: {
		if (kg_get_uint(r, &u)) return CKR_DEVICE_ERROR;
		CK_ULONG v = (CK_ULONG)u;
		return place(a, &v, sizeof(v));
	}
	case KG_KIND_MECHANISMS: {
		if (kg_get_array(r, &count)) return CKR_DEVICE_ERROR;
		CK_ULONG *v = malloc(count ? count * sizeof(*v) : 1);
		if (!v) return CKR_HOST_MEMORY;
		for (uint32_t i = 0; i < count && rv == CKR_OK; i++) {
			if (kg_get_uint(r, &u)) rv = CKR_DEVICE_ERROR;
			v[i] = (CK_ULONG)u;
		}
		if (rv == CKR_OK) rv = place(a, v, count * sizeof(*v));
		free(v);
		return rv;
	}
	case KG_KIND_TEMPLATE: {
		if (depth >= 2 || kg_get_array(r, &count)) return CKR_DEVICE_ERROR;
		CK_ULONG size = count * sizeof(CK_ATTRIBUTE);
		CK_ATTRIBUTE *inner = a->pValue;
		int fill = inner && a->ulValueLen >= size;
		for (uint32_t i = 0; i < count; i++) {
			CK_ATTRIBUTE scratch = {0, NULL, 0};
			CK_ATTRIBUTE *e = fill ? &inner[i] : &scratch;
			if (kg_get_array(r, &pair) || pair != 2 || kg_get_uint(r, &u)) return CKR_DEVICE_ERROR;
			e->type = (CK_ATTRIBUTE_TYPE)u;
			CK_RV erv = get_value(r, e, depth + 1);
			if (erv == CKR_DEVICE_ERROR || erv == CKR_HOST_MEMORY) return erv;
			if (erv != CKR_OK) rv = erv;
		}
		if (!inner)
			a->ulValueLen = size;
		else if (!fill) {
			a->ulValueLen = CK_UNAVAILABLE_INFORMATION;
			rv = CKR_BUFFER_TOO_SMALL;
		} else
			a->ulValueLen = size;
		return rv;
	}
	default:
		if (kg_get_bin(r, &p, &n)) return CKR_DEVICE_ERROR;
		return place(a, p, n);
	}
}

CK_RV kg_get_attribute_values(struct kg_reader *r, CK_ATTRIBUTE *t, CK_ULONG n, CK_RV rv)
{
	uint32_t count;
	CK_RV local = CKR_OK;
	if (rv != CKR_OK && rv != CKR_ATTRIBUTE_SENSITIVE && rv != CKR_ATTRIBUTE_TYPE_INVALID) return rv;
	if (kg_get_array(r, &count) || count != n) return CKR_DEVICE_ERROR;
	for (CK_ULONG i = 0; i < n; i++) {
		CK_RV e = get_value(r, &t[i], 0);
		if (e == CKR_DEVICE_ERROR || e == CKR_HOST_MEMORY) return e;
		if (e != CKR_OK) local = e;
	}
	return rv != CKR_OK ? rv : local;
}

CK_RV kg_get_out(struct kg_reader *r, CK_RV rv, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	uint32_t n;
	uint64_t len;
	const uint8_t *p;
	size_t plen;
	if (rv != CKR_OK && rv != CKR_BUFFER_TOO_SMALL) return rv;
	if (kg_get_array(r, &n) || n != 2) return CKR_DEVICE_ERROR;
	if (kg_peek(r) == KG_T_NIL) { /* a length answer */
		if (kg_get_nil(r) || kg_get_uint(r, &len) || len > (CK_ULONG)-2) return CKR_DEVICE_ERROR;
		*out_len = (CK_ULONG)len;
		return rv;
	}
	if (rv != CKR_OK || kg_get_bin(r, &p, &plen) || kg_get_uint(r, &len) || len != plen) return CKR_DEVICE_ERROR;
	if (!out || *out_len < plen) {
		*out_len = plen;
		return out ? CKR_BUFFER_TOO_SMALL : CKR_OK;
	}
	if (plen) memcpy(out, p, plen);
	*out_len = plen;
	return CKR_OK;
}

CK_RV kg_get_bytes(struct kg_reader *r, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	const uint8_t *p;
	size_t n;
	if (kg_get_bin(r, &p, &n)) return CKR_DEVICE_ERROR;
	if (!out || *out_len < n) {
		*out_len = n;
		return out ? CKR_BUFFER_TOO_SMALL : CKR_OK;
	}
	if (n) memcpy(out, p, n);
	*out_len = n;
	return CKR_OK;
}

/* An array of ulongs. fixed: `out` has room for *count and more is a device
 * error; else the two-call idiom (NULL out: the count; short: too small). */
CK_RV kg_get_ulongs(struct kg_reader *r, CK_ULONG *out, CK_ULONG_PTR count, int fixed)
{
	uint32_t n;
	uint64_t v;
	if (kg_get_array(r, &n)) return CKR_DEVICE_ERROR;
	if (fixed && n > *count) return CKR_DEVICE_ERROR;
	if (!out || *count < n) {
		*count = n;
		return out ? CKR_BUFFER_TOO_SMALL : CKR_OK;
	}
	for (uint32_t i = 0; i < n; i++) {
		if (kg_get_uint(r, &v)) return CKR_DEVICE_ERROR;
		out[i] = (CK_ULONG)v;
	}
	*count = n;
	return CKR_OK;
}

/* ---- info structures (v2.40 Base 3.1-3.5) ---- */

enum { F_STR, F_ULONG, F_VERSION };
struct field {
	const char *key;
	size_t off;
	unsigned char type, size;
};

#define STR(s, m, k)                                          \
	{                                                     \
		k, offsetof(s, m), F_STR, sizeof(((s *)0)->m) \
	}
#define UL(s, m, k)                           \
	{                                     \
		k, offsetof(s, m), F_ULONG, 0 \
	}
#define VER(s, m, k)                            \
	{                                       \
		k, offsetof(s, m), F_VERSION, 0 \
	}

static const struct field info_fields[] = {VER(CK_INFO, cryptokiVersion, "cryptoki_version"),
                                           STR(CK_INFO, manufacturerID, "manufacturer_id"),
                                           UL(CK_INFO, flags, "flags"),
                                           STR(CK_INFO, libraryDescription, "library_description"),
                                           VER(CK_INFO, libraryVersion, "library_version"),
                                           {0}};
static const struct field slot_fields[] = {STR(CK_SLOT_INFO, slotDescription, "slot_description"),
                                           STR(CK_SLOT_INFO, manufacturerID, "manufacturer_id"),
                                           UL(CK_SLOT_INFO, flags, "flags"),
                                           VER(CK_SLOT_INFO, hardwareVersion, "hardware_version"),
                                           VER(CK_SLOT_INFO, firmwareVersion, "firmware_version"),
                                           {0}};
static const struct field token_fields[] = {STR(CK_TOKEN_INFO, label, "label"),
                                            STR(CK_TOKEN_INFO, manufacturerID, "manufacturer_id"),
                                            STR(CK_TOKEN_INFO, model, "model"),
                                            STR(CK_TOKEN_INFO, serialNumber, "serial_number"),
                                            UL(CK_TOKEN_INFO, flags, "flags"),
                                            UL(CK_TOKEN_INFO, ulMaxSessionCount, "max_session_count"),
                                            UL(CK_TOKEN_INFO, ulSessionCount, "session_count"),
                                            UL(CK_TOKEN_INFO, ulMaxRwSessionCount, "max_rw_session_count"),
                                            UL(CK_TOKEN_INFO, ulRwSessionCount, "rw_session_count"),
                                            UL(CK_TOKEN_INFO, ulMaxPinLen, "max_pin_len"),
                                            UL(CK_TOKEN_INFO, ulMinPinLen, "min_pin_len"),
                                            UL(CK_TOKEN_INFO, ulTotalPublicMemory, "total_public_memory"),
                                            UL(CK_TOKEN_INFO, ulFreePublicMemory, "free_public_memory"),
                                            UL(CK_TOKEN_INFO, ulTotalPrivateMemory, "total_private_memory"),
                                            UL(CK_TOKEN_INFO, ulFreePrivateMemory, "free_private_memory"),
                                            VER(CK_TOKEN_INFO, hardwareVersion, "hardware_version"),
                                            VER(CK_TOKEN_INFO, firmwareVersion, "firmware_version"),
                                            STR(CK_TOKEN_INFO, utcTime, "utc_time"),
                                            {0}};
static const struct field session_fields[] = {UL(CK_SESSION_INFO, slotID, "slot_id"),
                                              UL(CK_SESSION_INFO, state, "state"),
                                              UL(CK_SESSION_INFO, flags, "flags"),
                                              UL(CK_SESSION_INFO, ulDeviceError, "device_error"),
                                              {0}};
static const struct field mechanism_fields[] = {UL(CK_MECHANISM_INFO, ulMinKeySize, "min_key_size"),
                                                UL(CK_MECHANISM_INFO, ulMaxKeySize, "max_key_size"),
                                                UL(CK_MECHANISM_INFO, flags, "flags"),
                                                {0}};

static const struct {
	const struct field *fields;
	size_t size;
} infos[] = {
        [KG_INFO] = {info_fields, sizeof(CK_INFO)},
        [KG_SLOT_INFO] = {slot_fields, sizeof(CK_SLOT_INFO)},
        [KG_TOKEN_INFO] = {token_fields, sizeof(CK_TOKEN_INFO)},
        [KG_SESSION_INFO] = {session_fields, sizeof(CK_SESSION_INFO)},
        [KG_MECHANISM_INFO] = {mechanism_fields, sizeof(CK_MECHANISM_INFO)},
};

void kg_pad(CK_UTF8CHAR *dst, size_t size, const char *src, size_t n)
{
	if (n > size) {
		n = size;
		while (n > 0 && ((unsigned char)src[n] & 0xc0) == 0x80)
			n--; /* src[n] continues a character */
	}
	memcpy(dst, src, n);
	memset(dst + n, ' ', size - n);
}

CK_RV kg_get_info(struct kg_reader *r, enum kg_info kind, void *out)
{
	const struct field *fields = infos[kind].fields;
	uint32_t n, vn;
	uint64_t a, b;
	memset(out, 0, infos[kind].size);
	for (const struct field *f = fields; f->key; f++)
		if (f->type == F_STR) kg_pad((CK_UTF8CHAR *)out + f->off, f->size, "", 0);
	if (kg_get_map(r, &n)) return CKR_DEVICE_ERROR;
	for (uint32_t i = 0; i < n; i++) {
		const char *key, *s;
		size_t klen, slen;
		const struct field *f = fields;
		if (kg_get_str(r, &key, &klen)) return CKR_DEVICE_ERROR;
		while (f->key && (strlen(f->key) != klen || memcmp(f->key, key, klen)))
			f++;
		CK_BYTE *dst = (CK_BYTE *)out + f->off;
		if (!f->key) {
			if (kg_skip(r)) return CKR_DEVICE_ERROR; /* a newer daemon's key */
		} else if (f->type == F_STR) {
			if (kg_get_str(r, &s, &slen)) return CKR_DEVICE_ERROR;
			kg_pad(dst, f->size, s, slen);
		} else if (f->type == F_ULONG) {
			if (kg_get_uint(r, &a)) return CKR_DEVICE_ERROR;
			CK_ULONG v = (CK_ULONG)a;
			memcpy(dst, &v, sizeof(v));
		} else {
			if (kg_get_array(r, &vn) || vn != 2 || kg_get_uint(r, &a) || kg_get_uint(r, &b) || a > 255 ||
			    b > 255)
				return CKR_DEVICE_ERROR;
			CK_VERSION v = {(CK_BYTE)a, (CK_BYTE)b};
			memcpy(dst, &v, sizeof(v));
		}
	}
	return CKR_OK;
}
