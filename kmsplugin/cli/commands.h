#pragma once

// The kmsplugin command line (ARCHITECTURE.md "operator-facing contract"):
//   kmsplugin serve  --config FILE
//   kmsplugin init   --config FILE [--env NAME]
//   kmsplugin rotate --config FILE --env NAME
//   kmsplugin keys   --config FILE --env NAME [--json]
//   kmsplugin status --socket PATH [--json]
//   kmsplugin render --config FILE --env NAME   # EncryptionConfiguration for kube-apiserver
//   kmsplugin version
// Errors go to stderr as one line naming the problem and the fix; the exit code is non-zero.

namespace kmsplugin::cli {

int Main(int argc, char** argv);

}  // namespace kmsplugin::cli
