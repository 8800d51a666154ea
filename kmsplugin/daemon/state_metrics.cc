#include "kmsplugin/daemon/state_metrics.h"

#include <map>

#include "absl/time/time.h"
#include "crypto/envelope_format.h"
#include "kmsplugin/core/version_rules.h"

namespace kmsplugin::daemon {

// Gauges read from state at scrape time, so an old key_id disappears from kmsplugin_key_info after a rotation,
// and an environment a reload removed disappears from every family.
void RegisterStateMetrics(observe::Registry& registry, ServicesFn services, const std::string& version) {
  registry.AddGaugeCollector("kmsplugin_build_info", "Always 1; the version label names the build.", [version] {
    return std::vector<observe::Sample>{{{{"version", version}}, 1}};
  });
  registry.AddGaugeCollector(
      "kmsplugin_key_info", "Always 1; names each environment's current key_id (the one Status reports).",
      [services] {
        std::vector<observe::Sample> samples;
        for (const auto& service : services()) {
          samples.push_back({{{"environment", service->environment()},
                              {"key_source", crypto::KeySourceKindName(service->key_source()->Kind())},
                              {"key_id", service->Status().key_id}},
                             1});
        }
        return samples;
      });
  registry.AddGaugeCollector("kmsplugin_environment_healthy",
                             "1 when the environment's last wrap+unwrap health probe succeeded recently.", [services] {
                               std::vector<observe::Sample> samples;
                               for (const auto& service : services()) {
                                 samples.push_back({{{"environment", service->environment()}},
                                                    service->Status().healthz == "ok" ? 1.0 : 0.0});
                               }
                               return samples;
                             });
  registry.AddGaugeCollector(
      "kmsplugin_key_last_rotation_timestamp_seconds", "Creation time of each environment's current key version.",
      [services] {
        std::vector<observe::Sample> samples;
        for (const auto& service : services()) {
          if (auto current = service->key_source()->Current(); current.ok()) {
            samples.push_back({{{"environment", service->environment()}},
                               static_cast<double>(absl::ToUnixSeconds(current->created))});
          }
        }
        return samples;
      });
  registry.AddGaugeCollector("kmsplugin_key_versions", "Key versions by environment and state.", [services] {
    std::vector<observe::Sample> samples;
    for (const auto& service : services()) {
      auto versions = service->key_source()->Versions();
      if (!versions.ok()) {
        continue;
      }
      std::map<std::string, double> by_state{{"current", 0}, {"active", 0}, {"staged", 0}, {"retired", 0}};
      for (const core::KeyVersion& v : *versions) {
        by_state[std::string(core::KeyStateName(v.state))] += 1;
      }
      for (const auto& [state, count] : by_state) {
        samples.push_back({{{"environment", service->environment()}, {"state", state}}, count});
      }
    }
    return samples;
  });
  registry.AddGaugeCollector(
      "kmsplugin_key_set_info",
      "Always 1; the fingerprint label names each environment's key set (versions, key_ids, states; no key "
      "material). Control-plane nodes that differ do not hold the same versions (RUNBOOK \"Several control-plane "
      "nodes\").",
      [services] {
        std::vector<observe::Sample> samples;
        for (const auto& service : services()) {
          if (auto versions = service->key_source()->Versions(); versions.ok()) {
            samples.push_back(
                {{{"environment", service->environment()}, {"fingerprint", core::KeySetFingerprint(*versions)}}, 1});
          }
        }
        return samples;
      });
}

// Backend numbers (Vault token TTL, HSM session pool): one family per name any key source reports. Called at
// start and after each applied reload (a new environment may bring a new family); `registered` remembers.
void RegisterBackendGauges(observe::Registry& registry, const ServicesFn& services, std::set<std::string>& registered) {
  for (const auto& service : services()) {
    for (const core::BackendGauge& gauge : service->key_source()->BackendGauges()) {
      if (!registered.insert(gauge.name).second) {
        continue;
      }
      registry.AddGaugeCollector(gauge.name, gauge.help, [services, name = gauge.name] {
        std::vector<observe::Sample> samples;
        for (const auto& service : services()) {
          for (const core::BackendGauge& g : service->key_source()->BackendGauges()) {
            if (g.name == name) {
              samples.push_back({{{"environment", service->environment()}}, g.value});
            }
          }
        }
        return samples;
      });
    }
  }
}

}  // namespace kmsplugin::daemon
