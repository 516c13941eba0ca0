// A C++ host driving Tezzeret's runtime: queue priorities, a refresh after
// the host's catalog changed, an urgent compile that jumps the queue, a
// quarantine hazard (an endless loop) opening the timeout breaker and
// putting the forge into conservative mode, and telemetry decoded from
// Leyline bytes — periodic packets from the forge's background thread
// included. Callbacks may run on that thread, so the host's state is
// guarded by a mutex (the example is also run under ThreadSanitizer).
// Exits non-zero if an expectation fails.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include <tezzeret.h>

#include "leyline_wire.h"

namespace {

struct StatusDeleter {
  void operator()(tezzeret_status *s) const { tezzeret_status_free(s); }
};
struct BufferDeleter {
  void operator()(tezzeret_buffer *b) const { tezzeret_buffer_free(b); }
};
using Status = std::unique_ptr<tezzeret_status, StatusDeleter>;
using Buffer = std::unique_ptr<tezzeret_buffer, BufferDeleter>;

void check(tezzeret_status *raw, const char *what) {
  Status status(raw);
  if (status) throw std::runtime_error(std::string(what) + ": " + tezzeret_status_message(status.get()));
}

std::string text(const lw_field &f) { return std::string(reinterpret_cast<const char *>(f.ptr), f.len); }

// A decoded Leyline `SystemHealth`: status and indicators.
struct Health {
  uint64_t status = 0;  // 1 HEALTHY, 2 DEGRADED, ...
  std::map<std::string, std::string> indicators;

  static Health decode(const uint8_t *bytes, size_t len) {
    Health h;
    lw_reader r{bytes, bytes + len};
    lw_field f{};
    while (lw_next(&r, &f) == 1) {
      if (f.field == 1) h.status = f.value;
      if (f.field != 3) continue;  // map<string, string> entry: key 1, value 2
      lw_reader e{f.ptr, f.ptr + f.len};
      lw_field ef{};
      std::string key, value;
      while (lw_next(&e, &ef) == 1) {
        if (ef.field == 1) key = text(ef);
        if (ef.field == 2) value = text(ef);
      }
      h.indicators[key] = value;
    }
    return h;
  }
};

struct Descriptor {
  std::string id, name;
  uint32_t tier;
  bool quarantine;
};

struct Host {
  std::mutex mutex;
  std::vector<Descriptor> descriptors;
  std::vector<std::string> announced;
  std::vector<std::string> events;
  int packets = 0;
  int periodic_health = 0;
  bool periodic_conservative = false;
  int releases = 0;

  static int enumerate(void *self, tezzeret_descriptor_sink *sink) {
    auto *host = static_cast<Host *>(self);
    std::lock_guard<std::mutex> lock(host->mutex);
    for (const auto &d : host->descriptors) {
      lw_buf b{};
      lw_descriptor(&b, d.id.c_str(), d.name.c_str(), d.tier, 0.2f, 1, d.quarantine ? 1 : 0, nullptr, 0, 0);
      Status st(tezzeret_descriptor_sink_push(sink, b.data, b.len));
      lw_free(&b);
      if (st) return 1;
    }
    return 0;
  }

  static void catalog_update(void *self, const uint8_t *bytes, size_t len) {
    auto *host = static_cast<Host *>(self);
    lw_reader r{bytes, bytes + len};
    lw_field f{};
    std::string id;
    while (lw_next(&r, &f) == 1) {
      if (f.field == 1) id = text(f);
    }
    std::lock_guard<std::mutex> lock(host->mutex);
    host->announced.push_back(id);
  }

  // TelemetryPacket: events are field 20 (description 2 names the event,
  // level 3), the
  // health snapshot field 40.
  static void telemetry(void *self, const uint8_t *bytes, size_t len) {
    auto *host = static_cast<Host *>(self);
    std::lock_guard<std::mutex> lock(host->mutex);
    host->packets++;
    lw_reader r{bytes, bytes + len};
    lw_field f{};
    while (lw_next(&r, &f) == 1) {
      if (f.field == 20) {
        lw_reader e{f.ptr, f.ptr + f.len};
        lw_field ef{};
        std::string name;
        uint64_t level = 0;
        while (lw_next(&e, &ef) == 1) {
          if (ef.field == 2) name = text(ef);
          if (ef.field == 3) level = ef.value;
        }
        if (name.find("breaker") != std::string::npos || name.find("conservative") != std::string::npos) {
          std::printf("  telemetry event %s (level %llu)\n", name.c_str(), static_cast<unsigned long long>(level));
        }
        host->events.push_back(name);
      } else if (f.field == 40) {
        Health h = Health::decode(f.ptr, f.len);
        host->periodic_health++;
        host->periodic_conservative = h.indicators["conservative"] == "true";
      }
    }
  }

  static void release(void *self) {
    auto *host = static_cast<Host *>(self);
    std::lock_guard<std::mutex> lock(host->mutex);
    host->releases++;
  }

  template <typename T>
  T read(T Host::*field) {
    std::lock_guard<std::mutex> lock(mutex);
    return this->*field;
  }

  bool saw_event(const std::string &name) {
    std::lock_guard<std::mutex> lock(mutex);
    return std::find(events.begin(), events.end(), name) != events.end();
  }
};

Health health(tezzeret_forge *forge) {
  tezzeret_buffer *raw = nullptr;
  check(tezzeret_forge_health(forge, &raw), "health");
  Buffer buffer(raw);
  return Health::decode(tezzeret_buffer_data(buffer.get()), tezzeret_buffer_len(buffer.get()));
}

void submit(tezzeret_forge *forge, const char *id, uint32_t priority) {
  uint64_t seq = 0;
  check(tezzeret_forge_submit(forge, id, priority, &seq), "submit");
  std::printf("  queued %s at priority %u (seq %llu)\n", id, priority, static_cast<unsigned long long>(seq));
}

bool wait_until(const std::function<bool()> &done) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

}  // namespace

int main() {
  int failures = 0;
  auto expect = [&failures](bool ok, const char *what) {
    if (!ok) {
      std::fprintf(stderr, "FAILED: %s\n", what);
      failures++;
    }
  };
  try {
    check(tezzeret_check_header_abi(), "ABI check");
    char tmpl[] = "/tmp/tezzeret-runtime-host-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp failed");
    const std::string dir = tmpl;

    Host host;
    host.descriptors = {{"A", "relu_activation", LW_TIER_SAFE, false},
                        {"B", "gelu_activation", LW_TIER_SAFE, false},
                        {"C", "layer_scaling", LW_TIER_SAFE, false}};
    tezzeret_config config;
    check(tezzeret_config_init(&config, sizeof config), "config init");
    config.state_dir = dir.c_str();
    config.device = TEZZERET_DEVICE_CPU;
    config.flags = TEZZERET_FLAG_ALLOW_QUARANTINE;  // lets the hazard compile (and fail)
    config.telemetry_interval_ms = 50;              // periodic packets from the background thread
    tezzeret_host_callbacks cb;
    check(tezzeret_host_callbacks_init(&cb, sizeof cb), "callbacks init");
    cb.user_data = &host;
    cb.enumerate = &Host::enumerate;
    cb.catalog_update = &Host::catalog_update;
    cb.telemetry = &Host::telemetry;
    cb.release = &Host::release;
    tezzeret_forge *forge = nullptr;
    check(tezzeret_forge_open(&config, &cb, &forge), "open");

    std::printf("priorities: C low, A critical, B normal\n");
    submit(forge, "C", TEZZERET_PRIORITY_LOW);
    submit(forge, "A", TEZZERET_PRIORITY_CRITICAL);
    submit(forge, "B", TEZZERET_PRIORITY_NORMAL);
    uint32_t completed = 0, failed = 0;
    check(tezzeret_forge_drain(forge, &completed, &failed), "drain");
    expect(completed == 3 && failed == 0, "three jobs completed");
    expect(host.read(&Host::announced) == std::vector<std::string>{"A", "B", "C"}, "announced in priority order");

    std::printf("refresh: the host adds D and E and drops C\n");
    {
      std::lock_guard<std::mutex> lock(host.mutex);
      host.descriptors.erase(host.descriptors.begin() + 2);
      host.descriptors.push_back({"D", "skip_connection", LW_TIER_SAFE, false});
      host.descriptors.push_back({"E", "highway_gate", LW_TIER_SAFE, false});
    }
    uint32_t queued = 0, removed = 0;
    check(tezzeret_forge_refresh(forge, &queued, &removed), "refresh");
    std::printf("  queued %u, removed %u\n", queued, removed);
    expect(queued == 2 && removed == 1, "two new descriptors queued, one reported removed");

    std::printf("urgent: E compiled now, ahead of the queued D\n");
    check(tezzeret_forge_compile_now(forge, "E"), "compile_now");
    expect(host.read(&Host::announced).back() == "E", "E announced first");
    expect(health(forge).indicators["queue_depth"] == "1", "D still queued");
    check(tezzeret_forge_drain(forge, &completed, &failed), "drain");
    expect(host.read(&Host::announced).back() == "D", "then D");

    std::printf("breaker: a quarantine hazard that never ends, twice\n");
    {
      std::lock_guard<std::mutex> lock(host.mutex);
      host.descriptors.push_back({"HANG", "infinite_loop", LW_TIER_HIGH_RISK, true});
      host.descriptors.push_back({"F", "dropout_light", LW_TIER_SAFE, false});
    }
    check(tezzeret_forge_refresh(forge, &queued, &removed), "refresh");
    for (int attempt = 1; attempt <= 2; attempt++) {
      // Only this job gets a tight deadline: every other compile keeps its
      // strategy's budget, however slow the machine is.
      Status st(tezzeret_forge_compile_now_within(forge, "HANG", 1000));
      uint32_t code = tezzeret_status_code(st.get());
      std::printf("  attempt %d: code %u: %s\n", attempt, code, tezzeret_status_message(st.get()));
      expect(code == TEZZERET_CODE_BUDGET_EXCEEDED, "the hazard is abandoned at its budget");
    }
    Health degraded = health(forge);
    std::printf("  health: status %llu, conservative %s, strategy %s, concurrency %s, breaker.timeout %s\n",
                static_cast<unsigned long long>(degraded.status), degraded.indicators["conservative"].c_str(),
                degraded.indicators["strategy"].c_str(), degraded.indicators["concurrency"].c_str(),
                degraded.indicators["breaker.timeout"].c_str());
    expect(degraded.status == 2, "health is DEGRADED");
    expect(degraded.indicators["conservative"] == "true", "conservative mode");
    expect(degraded.indicators["strategy"] == "fast", "strategy one level lower");
    expect(degraded.indicators["concurrency"] == "1", "one job at a time");
    expect(degraded.indicators["breaker.timeout"] == "open", "timeout breaker open");
    expect(host.saw_event("tezzeret.breaker_open"), "breaker_open event");
    expect(host.saw_event("tezzeret.conservative_mode_enabled"), "conservative_mode_enabled event");
    expect(wait_until([&host] { return host.read(&Host::periodic_conservative); }),
           "a periodic packet's health snapshot shows conservative mode");

    std::printf("conservative mode still compiles: F\n");
    check(tezzeret_forge_compile_now(forge, "F"), "compile_now F");
    expect(host.read(&Host::announced).back() == "F", "F announced");

    tezzeret_buffer *raw = nullptr;
    check(tezzeret_forge_metrics_prometheus(forge, &raw), "prometheus");
    Buffer metrics(raw);
    std::string exposition(reinterpret_cast<const char *>(tezzeret_buffer_data(metrics.get())),
                           tezzeret_buffer_len(metrics.get()));
    for (const char *line : {"tezzeret_breaker_state{breaker=\"timeout\"} 2", "tezzeret_mode_conservative 1"}) {
      std::printf("  prometheus: %s\n", line);
      expect(exposition.find(line) != std::string::npos, line);
    }

    tezzeret_forge_close(forge);
    int packets = host.read(&Host::packets);
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    expect(host.read(&Host::packets) == packets, "no telemetry after close returned");
    expect(host.read(&Host::releases) == 1, "released once");
    std::printf("  %d telemetry packets, %d with a health snapshot\n", packets, host.read(&Host::periodic_health));
    std::fflush(stdout);
    std::string cmd = "rm -rf '" + dir + "'";
    if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "warning: could not remove %s\n", dir.c_str());
  } catch (const std::exception &e) {
    std::fprintf(stderr, "FAILED: %s\n", e.what());
    return 1;
  }
  if (failures) return 1;
  std::printf("host_runtime: all expectations met\n");
  return 0;
}
