// A host whose threads share one forge: several threads call it at once
// (queue, urgent compiles, prefetch, health, metrics, guard checks) while
// its background thread sends telemetry, and one of them closes it while
// another is inside a long drain. Built with -fsanitize=thread against the
// TSan build of the library, it must run without a report. Exits non-zero
// if an expectation fails.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include <tezzeret.h>

#include "leyline_wire.h"

namespace {

std::atomic<int> failures{0};

void expect(bool ok, const char *what) {
  std::printf("  %s %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) failures++;
}

// The code of a call's status (freed here); 0 for success.
uint32_t code_of(tezzeret_status *status) {
  uint32_t code = tezzeret_status_code(status);
  tezzeret_status_free(status);
  return code;
}

struct Host {
  std::atomic<int> updates{0};
  std::atomic<int> packets{0};
  std::atomic<int> releases{0};
  std::atomic<bool> closed{false};
  std::atomic<int> after_close{0};

  static void on_update(void *self, const uint8_t *, size_t) {
    auto *host = static_cast<Host *>(self);
    if (host->closed.load()) host->after_close++;
    host->updates++;
  }
  static void on_telemetry(void *self, const uint8_t *, size_t) {
    auto *host = static_cast<Host *>(self);
    if (host->closed.load()) host->after_close++;
    host->packets++;
  }
  static void release(void *self) { static_cast<Host *>(self)->releases++; }
};

}  // namespace

int main() {
  if (tezzeret_status *st = tezzeret_check_header_abi()) {
    std::fprintf(stderr, "ABI: %s\n", tezzeret_status_message(st));
    return 1;
  }
  char tmpl[] = "/tmp/tezzeret-threads-host-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) return 1;
  const std::string dir = tmpl;

  Host host;
  tezzeret_config config;
  tezzeret_config_init(&config, sizeof config);
  config.state_dir = dir.c_str();
  config.device = TEZZERET_DEVICE_CPU;
  config.strategy = TEZZERET_STRATEGY_EMERGENCY;
  config.telemetry_interval_ms = 5;  // the background thread is busy too
  tezzeret_host_callbacks cb;
  tezzeret_host_callbacks_init(&cb, sizeof cb);
  cb.user_data = &host;
  cb.catalog_update = &Host::on_update;
  cb.telemetry = &Host::on_telemetry;
  cb.release = &Host::release;
  tezzeret_forge *forge = nullptr;
  if (code_of(tezzeret_forge_open(&config, &cb, &forge)) != 0) {
    std::fprintf(stderr, "open failed\n");
    return 1;
  }

  std::printf("callers: four threads share the forge\n");
  const char *urgent[] = {"BP002", "BP003", "BP005", "BP008"};
  std::vector<std::thread> callers;
  std::atomic<int> call_errors{0};
  for (int t = 0; t < 4; t++) {
    callers.emplace_back([&, t] {
      if (code_of(tezzeret_forge_compile_now(forge, urgent[t])) != 0) call_errors++;
      lw_buf request{};
      lw_put_string(&request, 1, "r");
      lw_put_string(&request, 2, urgent[t]);
      for (int i = 0; i < 20; i++) {
        uint32_t type = 0;
        tezzeret_buffer *answer = nullptr;
        if (code_of(tezzeret_forge_prefetch(forge, request.data, request.len, &type, &answer)) != 0) call_errors++;
        tezzeret_buffer_free(answer);
        tezzeret_buffer *health = nullptr;
        if (code_of(tezzeret_forge_health(forge, &health)) != 0) call_errors++;
        tezzeret_buffer_free(health);
        tezzeret_buffer *metrics = nullptr;
        if (code_of(tezzeret_forge_metrics_prometheus(forge, &metrics)) != 0) call_errors++;
        tezzeret_buffer_free(metrics);
        if (code_of(tezzeret_forge_submit(forge, "BP016", TEZZERET_PRIORITY_HIGH, nullptr)) != 0) call_errors++;
      }
      lw_free(&request);
    });
  }
  // A guard-table reader beside them, lock-free, on its own handle.
  std::thread reader([&] {
    tezzeret_guard_table *table = nullptr;
    if (code_of(tezzeret_forge_guard_table(forge, &table)) != 0) {
      call_errors++;
      return;
    }
    int64_t shape[2] = {8, 32}, stride[2] = {32, 1};
    tezzeret_tensor_meta input = {TEZZERET_DTYPE_FLOAT32, 2, shape, stride};
    for (int i = 0; i < 20000; i++) (void)tezzeret_guard_check(table, "BP002", &input, 1, nullptr);
    tezzeret_guard_table_close(table);
  });
  for (auto &t : callers) t.join();
  reader.join();
  expect(call_errors.load() == 0, "every call from every thread succeeded");
  expect(host.updates.load() >= 4, "the urgent compiles were announced");

  std::printf("close: one thread closes while another drains the queue\n");
  std::atomic<bool> draining{false};
  std::atomic<uint32_t> drain_code{999};
  std::thread drainer([&] {
    draining = true;
    drain_code = code_of(tezzeret_forge_drain(forge, nullptr, nullptr));
  });
  while (!draining.load()) std::this_thread::yield();
  std::thread closer([&] {
    tezzeret_forge_close(forge);  // waits for the drain in progress, abandoning its compile
    host.closed = true;
  });
  closer.join();
  drainer.join();
  expect(drain_code.load() == 0, "the drain in progress returned");
  expect(host.releases.load() == 1, "released exactly once");
  expect(host.after_close.load() == 0, "no callback after close returned");

  std::string cmd = "rm -rf '" + dir + "'";
  if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "warning: could not remove %s\n", dir.c_str());
  if (failures.load() != 0) {
    std::printf("host_threads: %d expectations failed\n", failures.load());
    return 1;
  }
  std::printf("host_threads: all expectations met\n");
  return 0;
}
