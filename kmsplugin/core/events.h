#pragma once

// EventSink: how a key source says what happened to it, without knowing about logs or metrics.
//
// A key source reports each recovery, failover, re-login, credential file picked up and key-version change as
// one SourceEvent. The daemon's sink (kmsplugin/daemon) writes one log line with `"event":<name>` and counts it
// in kmsplugin_key_source_events_total{environment,key_source,event}; the CLI's sink only logs. Sources call
// Emit() from any thread, never while holding a lock the sink could need (the sink takes none of theirs).
//
// Fields are for names, versions, addresses, file paths and reasons: never a secret (ARCHITECTURE.md rule 6).
// Thread-safe.

#include <string>
#include <utility>
#include <vector>

namespace kmsplugin::core {

// The event names, one per thing an operator wants to see happen. A counter exists for each.
namespace event {
inline constexpr char kRecovered[] = "recovered";              // the backend answers again after failing
inline constexpr char kUnavailable[] = "unavailable";          // the backend stopped answering
inline constexpr char kFailover[] = "failover";                // another backend address took over
inline constexpr char kRelogin[] = "relogin";                  // a new login after the old one was refused
inline constexpr char kCredentialReloaded[] = "credential_reloaded";  // a token/PIN/secret file was re-read
inline constexpr char kTokenRenewed[] = "token_renewed";       // a Vault token's lease was extended
inline constexpr char kKeyVersionsChanged[] = "key_versions_changed";  // added, retired, reinstated, current moved
inline constexpr char kVersionViewRefused[] = "version_view_refused";  // a refresh that would break a rule
inline constexpr char kStarted[] = "started";                  // a key source that could not start has started
}  // namespace event

struct SourceEvent {
  std::string name;     // one of event::k...
  std::string message;  // one line for a person
  std::vector<std::pair<std::string, std::string>> fields;
  bool warning = false;  // logged at warn (a failure) rather than info (a recovery or a change)
};

class EventSink {
 public:
  virtual ~EventSink() = default;
  virtual void Emit(const SourceEvent& event) = 0;
};

// A sink that drops every event (tests, and callers that do not care).
EventSink& NullEventSink();

}  // namespace kmsplugin::core
