/*
 * A minimal protobuf wire encoder/decoder for the Leyline messages the
 * examples exchange with Tezzeret (esper.leyline.v1). Hosts with protobuf
 * available would use generated code instead; this keeps the examples free
 * of dependencies beyond Tezzeret itself.
 */
#ifndef LEYLINE_WIRE_H
#define LEYLINE_WIRE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A growable byte buffer. */
typedef struct {
  uint8_t *data;
  size_t len;
  size_t cap;
} lw_buf;

static inline void lw_put_byte(lw_buf *b, uint8_t byte) {
  if (b->len == b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 64;
    uint8_t *grown = (uint8_t *)realloc(b->data, cap);
    if (grown == NULL) abort();
    b->data = grown;
    b->cap = cap;
  }
  b->data[b->len++] = byte;
}

static inline void lw_put_raw(lw_buf *b, const void *bytes, size_t len) {
  const uint8_t *p = (const uint8_t *)bytes;
  for (size_t i = 0; i < len; i++) lw_put_byte(b, p[i]);
}

static inline void lw_put_varint(lw_buf *b, uint64_t v) {
  while (v >= 0x80) {
    lw_put_byte(b, (uint8_t)(v | 0x80));
    v >>= 7;
  }
  lw_put_byte(b, (uint8_t)v);
}

static inline void lw_put_tag(lw_buf *b, uint32_t field, uint32_t wire_type) {
  lw_put_varint(b, ((uint64_t)field << 3) | wire_type);
}

static inline void lw_put_bytes(lw_buf *b, uint32_t field, const void *bytes, size_t len) {
  lw_put_tag(b, field, 2);
  lw_put_varint(b, len);
  lw_put_raw(b, bytes, len);
}

static inline void lw_put_string(lw_buf *b, uint32_t field, const char *s) {
  lw_put_bytes(b, field, s, strlen(s));
}

static inline void lw_put_uint(lw_buf *b, uint32_t field, uint64_t v) {
  lw_put_tag(b, field, 0);
  lw_put_varint(b, v);
}

static inline void lw_put_double(lw_buf *b, uint32_t field, double v) {
  uint64_t bits;
  memcpy(&bits, &v, sizeof bits);
  lw_put_tag(b, field, 1);
  for (int i = 0; i < 8; i++) lw_put_byte(b, (uint8_t)(bits >> (8 * i)));
}

static inline void lw_put_float(lw_buf *b, uint32_t field, float v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);
  lw_put_tag(b, field, 5);
  for (int i = 0; i < 4; i++) lw_put_byte(b, (uint8_t)(bits >> (8 * i)));
}

static inline void lw_free(lw_buf *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

/* BlueprintTier values. */
enum { LW_TIER_SAFE = 1, LW_TIER_EXPERIMENTAL = 2, LW_TIER_HIGH_RISK = 3 };

/* Encodes a BlueprintDescriptor with at most one parameter (param may be NULL). */
static inline void lw_descriptor(lw_buf *b, const char *id, const char *name, uint32_t tier, float risk,
                                 uint32_t stage, int quarantine_only, const char *param, double min,
                                 double max) {
  lw_put_string(b, 1, id);
  lw_put_string(b, 2, name);
  lw_put_uint(b, 3, tier);
  if (param != NULL) {
    lw_buf bounds = {NULL, 0, 0}, entry = {NULL, 0, 0};
    lw_put_double(&bounds, 1, min);
    lw_put_double(&bounds, 2, max);
    lw_put_string(&entry, 1, param);
    lw_put_bytes(&entry, 2, bounds.data, bounds.len);
    lw_put_bytes(b, 4, entry.data, entry.len);
    lw_free(&bounds);
    lw_free(&entry);
  }
  lw_put_float(b, 5, risk);
  lw_put_uint(b, 6, stage);
  if (quarantine_only) {
    lw_put_uint(b, 7, 1);
    lw_put_uint(b, 8, 1);
  }
}

/* A cursor over encoded bytes. */
typedef struct {
  const uint8_t *p;
  const uint8_t *end;
} lw_reader;

/* One decoded field: varint/fixed values in `value`, length-delimited in ptr/len. */
typedef struct {
  uint32_t field;
  uint32_t wire_type;
  uint64_t value;
  const uint8_t *ptr;
  size_t len;
} lw_field;

static inline int lw_read_varint(lw_reader *r, uint64_t *out) {
  uint64_t v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (r->p >= r->end) return -1;
    uint8_t byte = *r->p++;
    v |= (uint64_t)(byte & 0x7f) << shift;
    if (!(byte & 0x80)) {
      *out = v;
      return 0;
    }
  }
  return -1;
}

/* Reads the next field: 1 = got one, 0 = end of message, -1 = malformed. */
static inline int lw_next(lw_reader *r, lw_field *f) {
  if (r->p >= r->end) return 0;
  uint64_t key;
  if (lw_read_varint(r, &key) != 0) return -1;
  f->field = (uint32_t)(key >> 3);
  f->wire_type = (uint32_t)(key & 7);
  f->ptr = NULL;
  f->len = 0;
  f->value = 0;
  switch (f->wire_type) {
    case 0:
      return lw_read_varint(r, &f->value) == 0 ? 1 : -1;
    case 1:
    case 5: {
      size_t n = f->wire_type == 1 ? 8 : 4;
      if ((size_t)(r->end - r->p) < n) return -1;
      for (size_t i = 0; i < n; i++) f->value |= (uint64_t)r->p[i] << (8 * i);
      r->p += n;
      return 1;
    }
    case 2: {
      uint64_t len;
      if (lw_read_varint(r, &len) != 0 || len > (uint64_t)(r->end - r->p)) return -1;
      f->ptr = r->p;
      f->len = (size_t)len;
      r->p += len;
      return 1;
    }
    default:
      return -1;
  }
}

static inline float lw_as_float(const lw_field *f) {
  uint32_t bits = (uint32_t)f->value;
  float v;
  memcpy(&v, &bits, sizeof v);
  return v;
}

static inline double lw_as_double(const lw_field *f) {
  double v;
  memcpy(&v, &f->value, sizeof v);
  return v;
}

#endif /* LEYLINE_WIRE_H */
