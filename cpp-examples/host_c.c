/*
 * A C host of Tezzeret: opens a forge over a temporary state directory,
 * hands it descriptors through the enumerate callback as Leyline bytes,
 * receives catalog updates, telemetry and log lines through callbacks,
 * decodes them and prints what it got. It also exercises the C ABI's
 * error paths and exits non-zero if any expectation fails.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <tezzeret.h>

#include "leyline_wire.h"

static int failures = 0;

#define EXPECT(cond, what)                                   \
  do {                                                       \
    if (!(cond)) {                                           \
      fprintf(stderr, "FAILED: %s (%s:%d)\n", what, __FILE__, __LINE__); \
      failures++;                                            \
    }                                                        \
  } while (0)

/* Checks that `status` has `code`, prints its message, frees it. */
static void expect_code(tezzeret_status *status, uint32_t code, const char *what) {
  uint32_t got = tezzeret_status_code(status);
  printf("  %-44s -> code %u: %s\n", what, got, tezzeret_status_message(status));
  if (got != code) {
    fprintf(stderr, "FAILED: %s: expected code %u, got %u\n", what, code, got);
    failures++;
  }
  tezzeret_status_free(status);
}

typedef struct {
  int catalog_updates;
  int telemetry_packets;
  int events;
  int log_lines;
  int releases;
  int pushes_refused;
} host_state;

static int enumerate(void *user_data, tezzeret_descriptor_sink *sink) {
  host_state *state = (host_state *)user_data;
  struct {
    const char *id, *name;
    uint32_t tier;
    int quarantine;
    const char *param;
    double min, max;
  } descriptors[] = {
      {"BP002", "linear_projection", LW_TIER_SAFE, 0, "scale", 0.5, 2.0},
      {"BP016", "squeeze_excitation", LW_TIER_SAFE, 0, "reduction", 4.0, 16.0},
      {"BP023", "transformer_block", LW_TIER_SAFE, 0, "layers", 1.0, 6.0},
      {"BP036", "mixture_of_experts_4", LW_TIER_EXPERIMENTAL, 0, "experts", 4.0, 8.0},
      {"BP045", "nan_injection", LW_TIER_HIGH_RISK, 1, "frequency", 0.01, 0.1},
  };
  for (size_t i = 0; i < sizeof descriptors / sizeof descriptors[0]; i++) {
    lw_buf b = {0};
    lw_descriptor(&b, descriptors[i].id, descriptors[i].name, descriptors[i].tier, 0.5f, 1,
                  descriptors[i].quarantine, descriptors[i].param, descriptors[i].min, descriptors[i].max);
    tezzeret_status *st = tezzeret_descriptor_sink_push(sink, b.data, b.len);
    EXPECT(st == NULL, "valid descriptor accepted");
    tezzeret_status_free(st);
    lw_free(&b);
  }
  /* Bad descriptors are refused one by one, with a message naming the problem. */
  lw_buf dup = {0};
  lw_descriptor(&dup, "BP002", "linear_projection", LW_TIER_SAFE, 0.1f, 0, 0, NULL, 0, 0);
  tezzeret_status *st = tezzeret_descriptor_sink_push(sink, dup.data, dup.len);
  printf("  push duplicate id -> %s\n", tezzeret_status_message(st));
  state->pushes_refused += st != NULL;
  tezzeret_status_free(st);
  lw_free(&dup);

  lw_buf bounds = {0};
  lw_descriptor(&bounds, "BP900", "linear_projection", LW_TIER_SAFE, 0.1f, 0, 0, "scale", 3.0, 1.0);
  st = tezzeret_descriptor_sink_push(sink, bounds.data, bounds.len);
  printf("  push min > max    -> %s\n", tezzeret_status_message(st));
  state->pushes_refused += st != NULL;
  tezzeret_status_free(st);
  lw_free(&bounds);

  const uint8_t garbage[] = {0x0a, 0xff, 0x01};
  st = tezzeret_descriptor_sink_push(sink, garbage, sizeof garbage);
  printf("  push malformed    -> %s\n", tezzeret_status_message(st));
  state->pushes_refused += tezzeret_status_code(st) == TEZZERET_CODE_MALFORMED;
  tezzeret_status_free(st);
  return 0;
}

static void on_catalog_update(void *user_data, const uint8_t *bytes, size_t len) {
  host_state *state = (host_state *)user_data;
  lw_reader r = {bytes, bytes + len};
  lw_field f;
  char id[64] = "", checksum[65] = "", digest[65] = "";
  float compile_ms = 0, prewarm_ms = 0;
  int rc;
  while ((rc = lw_next(&r, &f)) == 1) {
    char *dst = f.field == 1 ? id : f.field == 3 ? checksum : f.field == 4 ? digest : NULL;
    size_t cap = f.field == 1 ? sizeof id : 65;
    if (dst != NULL && f.wire_type == 2) {
      size_t n = f.len < cap - 1 ? f.len : cap - 1;
      memcpy(dst, f.ptr, n);
      dst[n] = 0;
    }
    if (f.field == 5) compile_ms = lw_as_float(&f);
    if (f.field == 6) prewarm_ms = lw_as_float(&f);
  }
  EXPECT(rc == 0, "KernelCatalogUpdate decodes");
  EXPECT(strlen(checksum) == 64 && strlen(digest) == 64, "checksum and guard digest are sha256 hex");
  printf("  catalog update: %s checksum=%.12s digest=%.12s compile=%.2f ms prewarm=%.4f ms\n", id, checksum,
         digest, compile_ms, prewarm_ms);
  state->catalog_updates++;
}

static void on_telemetry(void *user_data, const uint8_t *bytes, size_t len) {
  host_state *state = (host_state *)user_data;
  lw_reader r = {bytes, bytes + len};
  lw_field f;
  int metrics = 0, events = 0, rc;
  char source[32] = "";
  uint64_t level = 0;
  while ((rc = lw_next(&r, &f)) == 1) {
    if (f.field == 3 && f.len < sizeof source) {
      memcpy(source, f.ptr, f.len);
      source[f.len] = 0;
    }
    if (f.field == 4) level = f.value;
    if (f.field == 10) metrics++;
    if (f.field == 20) {
      lw_reader er = {f.ptr, f.ptr + f.len};
      lw_field ef;
      while (lw_next(&er, &ef) == 1) {
        if (ef.field == 2) printf("  telemetry event: %.*s\n", (int)ef.len, (const char *)ef.ptr);
      }
      events++;
    }
  }
  EXPECT(rc == 0, "TelemetryPacket decodes");
  EXPECT(strcmp(source, "tezzeret") == 0, "source_subsystem is tezzeret");
  printf("  telemetry packet: source=%s level=%llu metrics=%d events=%d\n", source, (unsigned long long)level,
         metrics, events);
  state->telemetry_packets++;
  state->events += events;
}

static void on_log(void *user_data, uint32_t level, const char *message) {
  host_state *state = (host_state *)user_data;
  printf("  log[%u]: %s\n", level, message);
  state->log_lines++;
}

static void on_release(void *user_data) {
  ((host_state *)user_data)->releases++;
}

int main(void) {
  printf("tezzeret %s (header %s), ABI %u.%u\n", tezzeret_version(), TEZZERET_VERSION, tezzeret_abi_major(),
         tezzeret_abi_minor());
  tezzeret_status *abi = tezzeret_check_header_abi();
  EXPECT(abi == NULL, "header ABI matches the library");
  tezzeret_status_free(abi);
  EXPECT(strcmp(tezzeret_version(), TEZZERET_VERSION) == 0, "header version matches the library");
  expect_code(tezzeret_check_abi(TEZZERET_ABI_MAJOR + 1, 0), TEZZERET_CODE_ABI_MISMATCH, "ABI major mismatch");

  char dir[] = "/tmp/tezzeret-c-host-XXXXXX";
  EXPECT(mkdtemp(dir) != NULL, "mkdtemp");

  host_state state = {0};
  tezzeret_host_callbacks callbacks;
  tezzeret_status *st = tezzeret_host_callbacks_init(&callbacks, sizeof callbacks);
  EXPECT(st == NULL, "callbacks init");
  callbacks.user_data = &state;
  callbacks.enumerate = enumerate;
  callbacks.catalog_update = on_catalog_update;
  callbacks.telemetry = on_telemetry;
  callbacks.log = on_log;
  callbacks.release = on_release;

  tezzeret_config config;
  st = tezzeret_config_init(&config, sizeof config);
  EXPECT(st == NULL, "config init");
  config.state_dir = dir;
  config.device = TEZZERET_DEVICE_CPU;

  printf("open %s\n", dir);
  tezzeret_forge *forge = NULL;
  st = tezzeret_forge_open(&config, &callbacks, &forge);
  EXPECT(st == NULL && forge != NULL, "forge opens");
  if (st != NULL) fprintf(stderr, "open: %s\n", tezzeret_status_message(st));
  tezzeret_status_free(st);
  EXPECT(state.pushes_refused == 3, "three bad descriptors refused at push");

  printf("error paths:\n");
  tezzeret_forge *second = NULL;
  expect_code(tezzeret_forge_open(&config, NULL, &second), TEZZERET_CODE_STATE_LOCKED, "second open of the same dir");
  EXPECT(second == NULL, "out-param untouched on failure");
  expect_code(tezzeret_forge_open(NULL, NULL, &second), TEZZERET_CODE_NULL_ARGUMENT, "NULL config");
  expect_code(tezzeret_forge_run(NULL, NULL), TEZZERET_CODE_NULL_ARGUMENT, "NULL forge");
  tezzeret_config bad = config;
  bad.state_dir = "/tmp/\xff\xfe-not-utf8";
  expect_code(tezzeret_forge_open(&bad, NULL, &second), TEZZERET_CODE_INVALID_UTF8, "invalid UTF-8 state_dir");
  bad = config;
  bad.strategy = 99;
  expect_code(tezzeret_forge_open(&bad, NULL, &second), TEZZERET_CODE_INVALID_ARGUMENT, "unknown strategy");
  expect_code(tezzeret_descriptor_validate(NULL, 5), TEZZERET_CODE_NULL_ARGUMENT, "NULL descriptor bytes");
  /* A consumer's fetch refuses a local path before asking any store. */
  expect_code(tezzeret_fleet_fetch_artifact(NULL, "/var/lib/forge/artifacts/a.pt", NULL, "a.pt"),
              TEZZERET_CODE_INVALID_ARGUMENT, "fetch by a local path");

  printf("run:\n");
  tezzeret_run_summary summary = {sizeof summary, 0, 0, 0, 0, 0};
  st = tezzeret_forge_run(forge, &summary);
  EXPECT(st == NULL, "run succeeds");
  tezzeret_status_free(st);
  printf("summary: total=%u ok=%u cached=%u failed=%u refused=%u\n", summary.total, summary.ok, summary.cached,
         summary.failed, summary.refused);
  EXPECT(summary.total == 5 && summary.ok == 4 && summary.refused == 1, "4 compiled, 1 quarantined refused");
  EXPECT(state.catalog_updates == 4, "one catalog update per artifact");
  EXPECT(state.telemetry_packets >= 4 && state.events > 0, "telemetry packets with events");

  tezzeret_buffer *json = NULL;
  st = tezzeret_forge_catalog_json(forge, &json);
  EXPECT(st == NULL && json != NULL, "catalog json");
  tezzeret_status_free(st);
  printf("catalog json: %zu bytes\n", tezzeret_buffer_len(json));
  EXPECT(tezzeret_buffer_len(json) > 100, "catalog json is not empty");
  tezzeret_buffer_free(json);

  printf("panic containment:\n");
  expect_code(tezzeret_forge_selftest_panic(forge), TEZZERET_CODE_INTERNAL, "panic inside the library");
  expect_code(tezzeret_forge_run(forge, NULL), TEZZERET_CODE_POISONED, "poisoned handle refuses work");

  tezzeret_forge_close(forge);
  tezzeret_forge_close(NULL);
  tezzeret_status_free(NULL);
  EXPECT(state.releases == 1, "release called exactly once");

  /* The directory is free again once closed. */
  st = tezzeret_forge_open(&config, NULL, &forge);
  EXPECT(st == NULL, "reopen after close");
  tezzeret_status_free(st);
  tezzeret_forge_close(forge);

  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", dir);

  if (failures) {
    fprintf(stderr, "%d expectation(s) failed\n", failures);
    return 1;
  }
  printf("host_c: all expectations met\n");
  return 0;
}
