/* wire.c - the MessagePack subset keygridd speaks.
 *
 * The encoder writes the shortest form of each value, byte for byte what
 * Python's msgpack.packb(..., use_bin_type=True) writes (the golden vectors in
 * tests/vectors/wire/ check it). The decoder reads peer data: every length is
 * checked against the bytes left before it is used, containers cannot claim
 * more elements than bytes remain, nesting is bounded by KG_MAX_DEPTH, and a
 * failed read poisons the reader so no later read succeeds. Floats, ext types
 * and timestamps are not part of the protocol and are rejected.
 */
#include <stdlib.h>
#include <string.h>

#include "keygrid.h"

/* ---- encoder ---- */

void kg_buf_free(struct kg_buf *b)
{
	free(b->data);
	memset(b, 0, sizeof(*b));
}

static uint8_t *reserve(struct kg_buf *b, size_t n)
{
	if (b->failed) return NULL;
	if (n > SIZE_MAX / 2 - b->len) goto fail;
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		while (cap < b->len + n)
			cap *= 2;
		uint8_t *p = realloc(b->data, cap);
		if (!p) goto fail;
		b->data = p;
		b->cap = cap;
	}
	b->len += n;
	return b->data + b->len - n;
fail:
	b->failed = 1;
	return NULL;
}

static void put_be(struct kg_buf *b, uint8_t tag, uint64_t v, int size)
{
	uint8_t *p = reserve(b, 1 + (size_t)size);
	if (!p) return;
	p[0] = tag;
	for (int i = 0; i < size; i++)
		p[1 + i] = (uint8_t)(v >> (8 * (size - 1 - i)));
}

void kg_put_nil(struct kg_buf *b)
{
	put_be(b, 0xc0, 0, 0);
}
void kg_put_bool(struct kg_buf *b, int v)
{
	put_be(b, v ? 0xc3 : 0xc2, 0, 0);
}

void kg_put_uint(struct kg_buf *b, uint64_t v)
{
	if (v < 0x80)
		put_be(b, (uint8_t)v, 0, 0);
	else if (v <= 0xff)
		put_be(b, 0xcc, v, 1);
	else if (v <= 0xffff)
		put_be(b, 0xcd, v, 2);
	else if (v <= 0xffffffffu)
		put_be(b, 0xce, v, 4);
	else
		put_be(b, 0xcf, v, 8);
}

void kg_put_int(struct kg_buf *b, int64_t v)
{
	if (v >= 0)
		kg_put_uint(b, (uint64_t)v);
	else if (v >= -32)
		put_be(b, (uint8_t)v, 0, 0);
	else if (v >= INT8_MIN)
		put_be(b, 0xd0, (uint8_t)v, 1);
	else if (v >= INT16_MIN)
		put_be(b, 0xd1, (uint16_t)v, 2);
	else if (v >= INT32_MIN)
		put_be(b, 0xd2, (uint32_t)v, 4);
	else
		put_be(b, 0xd3, (uint64_t)v, 8);
}

static void put_len(struct kg_buf *b, size_t n, uint8_t fix, size_t fixmax, const uint8_t tags[3])
{
	if (fix && n <= fixmax)
		put_be(b, (uint8_t)(fix | n), 0, 0);
	else if (tags[0] && n <= 0xff)
		put_be(b, tags[0], n, 1);
	else if (n <= 0xffff)
		put_be(b, tags[1], n, 2);
	else if (n <= 0xffffffffu)
		put_be(b, tags[2], n, 4);
	else
		b->failed = 1;
}

void kg_put_raw(struct kg_buf *b, const void *p, size_t n)
{
	uint8_t *dst = reserve(b, n);
	if (dst && n) memcpy(dst, p, n);
}

void kg_put_bin(struct kg_buf *b, const void *p, size_t n)
{
	static const uint8_t tags[3] = {0xc4, 0xc5, 0xc6};
	put_len(b, n, 0, 0, tags);
	kg_put_raw(b, p, n);
}

void kg_put_str(struct kg_buf *b, const char *s, size_t n)
{
	static const uint8_t tags[3] = {0xd9, 0xda, 0xdb};
	put_len(b, n, 0xa0, 31, tags);
	kg_put_raw(b, s, n);
}

void kg_put_array(struct kg_buf *b, uint32_t n)
{
	static const uint8_t tags[3] = {0, 0xdc, 0xdd};
	put_len(b, n, 0x90, 15, tags);
}

void kg_put_map(struct kg_buf *b, uint32_t n)
{
	static const uint8_t tags[3] = {0, 0xde, 0xdf};
	put_len(b, n, 0x80, 15, tags);
}

/* ---- decoder ---- */

static int fail(struct kg_reader *r)
{
	r->bad = 1;
	return -1;
}

static int take(struct kg_reader *r, size_t n, const uint8_t **p)
{
	if (r->bad || n > r->len - r->pos) return fail(r);
	*p = r->p + r->pos;
	r->pos += n;
	return 0;
}

static uint64_t be(const uint8_t *p, int n)
{
	uint64_t v = 0;
	for (int i = 0; i < n; i++)
		v = (v << 8) | p[i];
	return v;
}

/* Reads an n-byte big-endian number after the tag. */
static int number(struct kg_reader *r, int n, uint64_t *v)
{
	const uint8_t *p;
	if (take(r, (size_t)n, &p)) return -1;
	*v = be(p, n);
	return 0;
}

enum kg_type kg_peek(struct kg_reader *r)
{
	if (r->bad || r->pos >= r->len) return KG_T_NONE;
	uint8_t t = r->p[r->pos];
	if (t <= 0x7f || (t >= 0xcc && t <= 0xcf)) return KG_T_UINT;
	if (t >= 0xe0 || (t >= 0xd0 && t <= 0xd3)) return KG_T_INT;
	if ((t & 0xe0) == 0xa0 || (t >= 0xd9 && t <= 0xdb)) return KG_T_STR;
	if ((t & 0xf0) == 0x90 || t == 0xdc || t == 0xdd) return KG_T_ARRAY;
	if ((t & 0xf0) == 0x80 || t == 0xde || t == 0xdf) return KG_T_MAP;
	if (t >= 0xc4 && t <= 0xc6) return KG_T_BIN;
	if (t == 0xc0) return KG_T_NIL;
	if (t == 0xc2 || t == 0xc3) return KG_T_BOOL;
	return KG_T_OTHER;
}

int kg_get_nil(struct kg_reader *r)
{
	if (kg_peek(r) != KG_T_NIL) return fail(r);
	r->pos++;
	return 0;
}

int kg_get_bool(struct kg_reader *r, int *v)
{
	if (kg_peek(r) != KG_T_BOOL) return fail(r);
	*v = r->p[r->pos++] == 0xc3;
	return 0;
}

/* Unsigned integers; a signed encoding of a value >= 0 is accepted too. */
int kg_get_uint(struct kg_reader *r, uint64_t *v)
{
	int64_t s;
	enum kg_type t = kg_peek(r);
	if (t == KG_T_INT) {
		if (kg_get_int(r, &s) || s < 0) return fail(r);
		*v = (uint64_t)s;
		return 0;
	}
	if (t != KG_T_UINT) return fail(r);
	uint8_t tag = r->p[r->pos++];
	if (tag <= 0x7f) {
		*v = tag;
		return 0;
	}
	return number(r, 1 << (tag - 0xcc), v);
}

int kg_get_int(struct kg_reader *r, int64_t *v)
{
	uint64_t u;
	enum kg_type t = kg_peek(r);
	if (t == KG_T_UINT) {
		if (kg_get_uint(r, &u) || u > INT64_MAX) return fail(r);
		*v = (int64_t)u;
		return 0;
	}
	if (t != KG_T_INT) return fail(r);
	uint8_t tag = r->p[r->pos++];
	if (tag >= 0xe0) {
		*v = (int8_t)tag;
		return 0;
	}
	int n = 1 << (tag - 0xd0);
	if (number(r, n, &u)) return -1;
	if (n < 8 && (u >> (8 * n - 1))) u |= ~(uint64_t)0 << (8 * n); /* sign-extend */
	*v = (int64_t)u;
	return 0;
}

/* The length of a str/bin/array/map whose kind kg_peek has checked. */
static int length(struct kg_reader *r, uint32_t *n)
{
	uint64_t v;
	int size;
	uint8_t tag = r->p[r->pos++];
	if ((tag & 0xe0) == 0xa0 || (tag & 0xe0) == 0x80) { /* fixstr; fixmap, fixarray */
		*n = tag & ((tag & 0xe0) == 0xa0 ? 0x1f : 0x0f);
		return 0;
	}
	if (tag == 0xc4 || tag == 0xd9)
		size = 1;
	else if (tag == 0xc5 || tag == 0xda || tag == 0xdc || tag == 0xde)
		size = 2;
	else
		size = 4;
	if (number(r, size, &v)) return -1;
	*n = (uint32_t)v;
	return 0;
}

static int bytes(struct kg_reader *r, enum kg_type want, const uint8_t **p, size_t *n)
{
	uint32_t len;
	if (kg_peek(r) != want || length(r, &len) || take(r, len, p)) return fail(r);
	*n = len;
	return 0;
}

int kg_get_bin(struct kg_reader *r, const uint8_t **p, size_t *n)
{
	return bytes(r, KG_T_BIN, p, n);
}
int kg_get_str(struct kg_reader *r, const char **s, size_t *n)
{
	return bytes(r, KG_T_STR, (const uint8_t **)s, n);
}

/* Containers: each element takes at least one byte, so a count above the
 * bytes left is a lie and is rejected before anyone allocates for it. */
static int container(struct kg_reader *r, enum kg_type want, uint32_t per, uint32_t *n)
{
	if (kg_peek(r) != want || length(r, n)) return fail(r);
	if ((uint64_t)*n * per > r->len - r->pos) return fail(r);
	return 0;
}

int kg_get_array(struct kg_reader *r, uint32_t *n)
{
	return container(r, KG_T_ARRAY, 1, n);
}
int kg_get_map(struct kg_reader *r, uint32_t *n)
{
	return container(r, KG_T_MAP, 2, n);
}

static int skip(struct kg_reader *r, int depth)
{
	const uint8_t *p;
	size_t n;
	uint32_t count;
	uint64_t u, items;
	int64_t s;
	int b;
	if (depth > KG_MAX_DEPTH) return fail(r);
	switch (kg_peek(r)) {
	case KG_T_NIL:
		return kg_get_nil(r);
	case KG_T_BOOL:
		return kg_get_bool(r, &b);
	case KG_T_UINT:
		return kg_get_uint(r, &u);
	case KG_T_INT:
		return kg_get_int(r, &s);
	case KG_T_BIN:
		return kg_get_bin(r, &p, &n);
	case KG_T_STR:
		return kg_get_str(r, (const char **)&p, &n);
	case KG_T_ARRAY:
		if (kg_get_array(r, &count)) return -1;
		items = count;
		break;
	case KG_T_MAP:
		if (kg_get_map(r, &count)) return -1;
		items = 2 * (uint64_t)count;
		break;
	default:
		return fail(r);
	}
	for (uint64_t i = 0; i < items; i++)
		if (skip(r, depth + 1)) return -1;
	return 0;
}

int kg_skip(struct kg_reader *r)
{
	return skip(r, 0);
}

int kg_check_value(const uint8_t *p, size_t len)
{
	struct kg_reader r = {p, len, 0, 0};
	return skip(&r, 0) || r.pos != len ? -1 : 0;
}
