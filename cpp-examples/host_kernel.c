/*
 * Runs a compiled kernel from C without linking libtorch: compiles one
 * blueprint into a temporary state directory, checks an input against the
 * guard table (lock-free), prefetches, loads the kernel and runs it on a
 * DLPack view of a plain C array. Exits non-zero if an expectation fails.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tezzeret.h>

#include "leyline_wire.h"

static int failures = 0;
#define EXPECT(cond, what)                                              \
  do {                                                                  \
    if (!(cond)) {                                                      \
      fprintf(stderr, "FAILED: %s (%s:%d)\n", what, __FILE__, __LINE__); \
      failures++;                                                       \
    }                                                                   \
  } while (0)

static int enumerate(void *user_data, tezzeret_descriptor_sink *sink) {
  (void)user_data;
  lw_buf b = {NULL, 0, 0};
  lw_descriptor(&b, "BP021", "feedforward_gated", LW_TIER_SAFE, 0.5f, 2, 0, "hidden_multiple", 2.0, 6.0);
  tezzeret_status *st = tezzeret_descriptor_sink_push(sink, b.data, b.len);
  lw_free(&b);
  int rc = st == NULL ? 0 : 1;
  tezzeret_status_free(st);
  return rc;
}

int main(void) {
  char dir[] = "/tmp/tezzeret-kernel-host-XXXXXX";
  if (mkdtemp(dir) == NULL) return 1;

  tezzeret_config config;
  tezzeret_config_init(&config, sizeof config);
  config.state_dir = dir;
  config.device = TEZZERET_DEVICE_CPU;
  tezzeret_host_callbacks callbacks;
  tezzeret_host_callbacks_init(&callbacks, sizeof callbacks);
  callbacks.enumerate = enumerate;

  tezzeret_forge *forge = NULL;
  tezzeret_status *st = tezzeret_forge_open(&config, &callbacks, &forge);
  EXPECT(st == NULL, "open");
  tezzeret_status_free(st);
  tezzeret_run_summary summary = {sizeof summary, 0, 0, 0, 0, 0};
  st = tezzeret_forge_run(forge, &summary);
  EXPECT(st == NULL && summary.ok == 1, "compile BP021");
  tezzeret_status_free(st);

  /* The input: [8, 12, 32] float32, contiguous. */
  int64_t shape[3] = {8, 12, 32};
  int64_t stride[3] = {12 * 32, 32, 1};
  size_t count = 8 * 12 * 32;
  float *data = malloc(count * sizeof *data);
  for (size_t i = 0; i < count; i++) data[i] = (float)((int)(i % 13) - 6) / 8.0f;

  /* 1. Guard check (what Kasmina does on its hot path). */
  tezzeret_guard_table *table = NULL;
  st = tezzeret_forge_guard_table(forge, &table);
  EXPECT(st == NULL, "open guard table");
  tezzeret_status_free(st);
  tezzeret_tensor_meta meta = {TEZZERET_DTYPE_FLOAT32, 3, shape, stride};
  tezzeret_guard_verdict verdict;
  verdict.struct_size = sizeof verdict;
  uint32_t result = tezzeret_guard_check(table, "BP021", &meta, 1, &verdict);
  printf("guard check: %u (match = %u)\n", result, TEZZERET_GUARD_MATCH);
  EXPECT(result == TEZZERET_GUARD_MATCH, "guard matches");
  int64_t wrong_shape[3] = {8, 12, 31};
  meta.shape = wrong_shape;
  result = tezzeret_guard_check(table, "BP021", &meta, 1, &verdict);
  printf("guard check of [8, 12, 31]: %u, input %u dimension %u expected %lld got %lld\n", result, verdict.input,
         verdict.dimension, (long long)verdict.expected, (long long)verdict.actual);
  EXPECT(result == TEZZERET_GUARD_SHAPE && verdict.dimension == 2, "shape mismatch named");
  tezzeret_guard_table_close(table);

  /* 2. Prefetch (Leyline KernelPrefetchRequest in, KernelArtifactReady out). */
  lw_buf request = {NULL, 0, 0};
  lw_put_string(&request, 1, "req-1");
  lw_put_string(&request, 2, "BP021");
  uint32_t kind = 0;
  tezzeret_buffer *answer = NULL;
  st = tezzeret_forge_prefetch(forge, request.data, request.len, &kind, &answer);
  EXPECT(st == NULL && kind == TEZZERET_PREFETCH_READY, "prefetch ready");
  tezzeret_status_free(st);
  lw_reader r = {tezzeret_buffer_data(answer), tezzeret_buffer_data(answer) + tezzeret_buffer_len(answer)};
  lw_field f;
  while (lw_next(&r, &f) == 1) {
    if (f.field == 6) printf("prefetch: ready, pre-warm p50 %.4f ms\n", lw_as_float(&f));
  }
  tezzeret_buffer_free(answer);
  lw_free(&request);

  /* 3. Load and run on a DLPack view of the C array. */
  tezzeret_kernel *kernel = NULL;
  st = tezzeret_forge_load_kernel(forge, "BP021", &kernel);
  EXPECT(st == NULL, "load kernel");
  tezzeret_status_free(st);
  tezzeret_dltensor input;
  memset(&input, 0, sizeof input);
  input.data = data;
  input.device.device_type = TEZZERET_DL_CPU;
  input.ndim = 3;
  input.dtype.code = TEZZERET_DL_FLOAT;
  input.dtype.bits = 32;
  input.dtype.lanes = 1;
  input.shape = shape;
  tezzeret_tensor *output = NULL;
  st = tezzeret_kernel_run(kernel, &input, 1, &output);
  EXPECT(st == NULL, "run kernel");
  if (st != NULL) fprintf(stderr, "run: %s\n", tezzeret_status_message(st));
  tezzeret_status_free(st);
  if (output != NULL) {
    const tezzeret_dltensor *view = tezzeret_tensor_dlpack(output);
    size_t n = 1;
    for (int i = 0; i < view->ndim; i++) n *= (size_t)view->shape[i];
    double sum = 0;
    for (size_t i = 0; i < n; i++) sum += ((const float *)view->data)[i];
    printf("output: ndim %d, [%lld, %lld, %lld], sum %.6f\n", view->ndim, (long long)view->shape[0],
           (long long)view->shape[1], (long long)view->shape[2], sum);
    EXPECT(view->ndim == 3 && view->shape[2] == 32, "output shape");
    tezzeret_tensor_free(output);
  }
  /* A mismatching input is refused with a named reason. */
  input.shape = wrong_shape;
  st = tezzeret_kernel_run(kernel, &input, 1, &output);
  printf("run with [8, 12, 31]: %s\n", tezzeret_status_message(st));
  EXPECT(tezzeret_status_code(st) == TEZZERET_CODE_INVALID_ARGUMENT, "mismatch refused");
  tezzeret_status_free(st);

  tezzeret_kernel_free(kernel);
  tezzeret_forge_close(forge);
  free(data);
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", dir);
  if (failures) return 1;
  printf("host_kernel: all expectations met\n");
  return 0;
}
