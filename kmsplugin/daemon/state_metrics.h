#pragma once

// The daemon's metrics that are read from state at scrape time: build info, each environment's key_id, health,
// last rotation, key versions by state, and the backend gauges each key source reports (Vault token TTL, PKCS#11
// session pool). Collectors list the environments being served at scrape time, so an environment a reload removed
// disappears from every family.

#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "kmsplugin/core/envelope_service.h"
#include "kmsplugin/observe/metrics.h"

namespace kmsplugin::daemon {

using Services = std::vector<std::shared_ptr<core::EnvelopeService>>;
using ServicesFn = std::function<Services()>;

// kmsplugin_build_info, kmsplugin_key_info, kmsplugin_environment_healthy,
// kmsplugin_key_last_rotation_timestamp_seconds, kmsplugin_key_versions, kmsplugin_key_set_info.
void RegisterStateMetrics(observe::Registry& registry, ServicesFn services, const std::string& version);

// One family per backend gauge name any served key source reports; `registered` remembers the names already
// registered (call again after a reload: a new environment may bring a new family).
void RegisterBackendGauges(observe::Registry& registry, const ServicesFn& services, std::set<std::string>& registered);

}  // namespace kmsplugin::daemon
