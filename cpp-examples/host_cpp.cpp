// A C++ host of Tezzeret: RAII ownership of every library object, host
// descriptors handed over as Leyline bytes, decoded catalog updates and
// telemetry, and a reopen that reuses the stored artifacts. Exits non-zero
// if an expectation fails.
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

#include <tezzeret.h>

#include "leyline_wire.h"

namespace {

struct StatusDeleter {
  void operator()(tezzeret_status *s) const { tezzeret_status_free(s); }
};
struct ForgeDeleter {
  void operator()(tezzeret_forge *f) const { tezzeret_forge_close(f); }
};
using Status = std::unique_ptr<tezzeret_status, StatusDeleter>;
using Forge = std::unique_ptr<tezzeret_forge, ForgeDeleter>;

// Throws on a failed call, carrying the library's message.
void check(tezzeret_status *raw, const char *what) {
  Status status(raw);
  if (status) {
    throw std::runtime_error(std::string(what) + ": " + tezzeret_status_message(status.get()));
  }
}

struct Descriptor {
  std::string id, name;
  uint32_t tier;
  std::string param;
  double min, max;
};

struct Host {
  std::vector<Descriptor> descriptors;
  std::vector<std::string> announced;
  int telemetry_packets = 0;
  int releases = 0;

  static int enumerate(void *self, tezzeret_descriptor_sink *sink) {
    auto *host = static_cast<Host *>(self);
    for (const auto &d : host->descriptors) {
      lw_buf b{};
      lw_descriptor(&b, d.id.c_str(), d.name.c_str(), d.tier, 0.4f, 2, 0, d.param.empty() ? nullptr : d.param.c_str(),
                    d.min, d.max);
      Status st(tezzeret_descriptor_sink_push(sink, b.data, b.len));
      lw_free(&b);
      if (st) {
        std::fprintf(stderr, "descriptor %s refused: %s\n", d.id.c_str(), tezzeret_status_message(st.get()));
        return 1;
      }
    }
    return 0;
  }

  static void catalog_update(void *self, const uint8_t *bytes, size_t len) {
    auto *host = static_cast<Host *>(self);
    lw_reader r{bytes, bytes + len};
    lw_field f{};
    std::string id, ref;
    while (lw_next(&r, &f) == 1) {
      if (f.field == 1) id.assign(reinterpret_cast<const char *>(f.ptr), f.len);
      if (f.field == 2) ref.assign(reinterpret_cast<const char *>(f.ptr), f.len);
    }
    std::printf("  announced %s -> %s\n", id.c_str(), ref.c_str());
    host->announced.push_back(id);
  }

  static void telemetry(void *self, const uint8_t *bytes, size_t len) {
    auto *host = static_cast<Host *>(self);
    lw_reader r{bytes, bytes + len};
    lw_field f{};
    while (lw_next(&r, &f) == 1) {
      if (f.field != 10) continue;  // MetricPoint
      lw_reader m{f.ptr, f.ptr + f.len};
      lw_field mf{};
      std::string name;
      double value = 0;
      while (lw_next(&m, &mf) == 1) {
        if (mf.field == 1) name.assign(reinterpret_cast<const char *>(mf.ptr), mf.len);
        if (mf.field == 2) value = lw_as_double(&mf);
      }
      if (name == "tezzeret.jobs.completed") std::printf("  telemetry: %s = %g\n", name.c_str(), value);
    }
    host->telemetry_packets++;
  }

  static void release(void *self) { static_cast<Host *>(self)->releases++; }

  tezzeret_host_callbacks callbacks() {
    tezzeret_host_callbacks cb;
    check(tezzeret_host_callbacks_init(&cb, sizeof cb), "callbacks init");
    cb.user_data = this;
    cb.enumerate = &Host::enumerate;
    cb.catalog_update = &Host::catalog_update;
    cb.telemetry = &Host::telemetry;
    cb.release = &Host::release;
    return cb;
  }
};

Forge open_forge(const std::string &dir, Host &host, size_t config_size) {
  tezzeret_config config;
  check(tezzeret_config_init(&config, sizeof config), "config init");
  config.struct_size = config_size;  // an older caller passes a smaller struct
  config.state_dir = dir.c_str();
  config.device = TEZZERET_DEVICE_CPU;
  tezzeret_host_callbacks cb = host.callbacks();
  tezzeret_forge *raw = nullptr;
  check(tezzeret_forge_open(&config, &cb, &raw), "open");
  return Forge(raw);
}

tezzeret_run_summary run(tezzeret_forge *forge) {
  tezzeret_run_summary summary{};
  summary.struct_size = sizeof summary;
  check(tezzeret_forge_run(forge, &summary), "run");
  std::printf("  summary: total=%u ok=%u cached=%u failed=%u refused=%u\n", summary.total, summary.ok, summary.cached,
              summary.failed, summary.refused);
  return summary;
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
    char tmpl[] = "/tmp/tezzeret-cpp-host-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp failed");
    const std::string dir = tmpl;

    Host host;
    host.descriptors = {
        {"BP013", "grouped_conv", LW_TIER_SAFE, "groups", 2, 8},
        {"BP021", "feedforward_gated", LW_TIER_SAFE, "hidden_multiple", 2, 6},
        {"BP030", "graph_attention", LW_TIER_SAFE, "hops", 1, 3},
        {"BP039", "neural_ode_block", LW_TIER_EXPERIMENTAL, "steps", 1, 10},
    };
    std::printf("first run in %s\n", dir.c_str());
    {
      Forge forge = open_forge(dir, host, sizeof(tezzeret_config));
      tezzeret_run_summary s = run(forge.get());
      expect(s.ok == 4 && s.failed == 0, "all four compiled");
    }
    expect(host.announced.size() == 4, "four catalog updates");
    expect(host.telemetry_packets >= 4, "telemetry received");
    expect(host.releases == 1, "release after close");

    std::printf("second run (older config struct without batch_size): stored artifacts are reused\n");
    {
      Forge forge = open_forge(dir, host, offsetof(tezzeret_config, batch_size));
      tezzeret_run_summary s = run(forge.get());
      expect(s.cached == 4 && s.ok == 0, "all four reused from the store");
    }
    expect(host.releases == 2, "release once per open");
    std::string cmd = "rm -rf '" + dir + "'";
    if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "warning: could not remove %s\n", dir.c_str());
  } catch (const std::exception &e) {
    std::fprintf(stderr, "FAILED: %s\n", e.what());
    return 1;
  }
  if (failures) return 1;
  std::printf("host_cpp: all expectations met\n");
  return 0;
}
