#pragma once

// `kmsplugin serve --config FILE`: serves every environment of FILE on its socket, with /metrics, /healthz and
// /readyz when http is enabled, until SIGTERM or SIGINT (drain, remove the sockets, exit 0). The composition is
// kmsplugin/daemon (daemon.h); this file only runs it.
//
// An environment whose key source cannot start (credentials refused, key missing, backend unreachable, a file
// with the wrong owner or mode) still serves, unhealthy, with the reason in Status and /readyz, and heals without
// a restart (daemon/starting_key_source.h). Only the config file itself, or a socket or HTTP address that cannot
// be bound, makes serve exit non-zero.
//
// SIGHUP re-reads FILE and applies it all or nothing (reload_plan.h says what counts as a change):
// - a file that does not load or validate, a change to server.* or http.* (restart-only), a new key source
//   that fails its wrap+unwrap probe or does not know a version the running one serves, a socket that cannot
//   be bound: the whole reload is rejected, the running configuration keeps serving unchanged, and one error
//   line "config reload rejected" ("event":"reload","result":"rejected") names the file, the field or
//   environment, and the fix;
// - otherwise environments are added, removed, re-keyed or moved to their new socket without dropping a call
//   on the others, and one line "config reloaded" ("event":"reload","result":"applied") names them.
// Either way every key source is then refreshed and re-probed, as before reloads existed.
// Metrics: kmsplugin_config_reloads_total{result="applied|rejected"}, kmsplugin_config_last_reload_successful
// (1/0) and kmsplugin_config_last_reload_success_timestamp_seconds (the start counts as a successful load).
// Collectors that list environments (kmsplugin_key_info, ...) always see the set being served.

#include <string>

namespace kmsplugin::cli {

// Returns the process exit code.
int Serve(const std::string& config_path);

}  // namespace kmsplugin::cli
