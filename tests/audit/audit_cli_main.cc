// audit_cli: `kmsplugin audit` on its own (same flags, same RunAudit), for bench/audit/run.sh and for trying the
// audit before it is wired into the kmsplugin binary. Knows the local key source only.

#include <CLI/CLI.hpp>

#include "kmsplugin/audit/audit_command.h"
#include "kmsplugin/keysource/local/local_spec.h"

int main(int argc, char** argv) {
  CLI::App app{"kmsplugin audit (standalone): what in etcd is encrypted under which KMS key"};
  kmsplugin::audit::AuditFlags flags;
  kmsplugin::audit::AddAuditFlags(app, flags);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  return kmsplugin::audit::RunAudit(flags, {{"local", kmsplugin::keysource::local::ParseSpec}});
}
