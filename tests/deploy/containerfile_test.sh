#!/usr/bin/env bash
# What can be checked of deploy/container/Containerfile without a container engine (there is none on the build
# machines): the runtime stage installs, for every shared library the built binary NEEDS, the Debian package that
# ships it (found with dpkg -S on this bookworm machine), and the image runs as a fixed non-root user.
set -euo pipefail
source_dir=${1:?usage: containerfile_test.sh SOURCE_DIR BINARY}
binary=${2:?usage: containerfile_test.sh SOURCE_DIR BINARY}
for tool in objdump ldd dpkg; do
  command -v "$tool" >/dev/null || { echo "SKIP: $tool not installed"; exit 77; }
done
[[ -x $binary ]] || { echo "FAIL: $binary not built"; exit 1; }
containerfile=$source_dir/deploy/container/Containerfile

# soname -> package, via the path the dynamic loader resolves on this machine.
needed=$(objdump -p "$binary" | awk '$1 == "NEEDED" { print $2 }')
[[ -n $needed ]] || { echo "FAIL: objdump found no NEEDED entries in $binary"; exit 1; }
resolved=$(ldd "$binary")
pairs=""
for soname in $needed; do
  path=$(awk -v so="$soname" '$1 == so && $2 == "=>" { print $3 }' <<<"$resolved")
  if [[ -z $path || $path == "not" ]]; then
    echo "FAIL: $soname (NEEDED by $binary) does not resolve on this machine"
    exit 1
  fi
  package=""
  # dpkg knows a file under the path it was shipped with; with merged /usr that may be /lib/... or /usr/lib/...
  for candidate in "$path" "$(readlink -f "$path")" "${path#/usr}" "/usr$path"; do
    package=$(dpkg -S "$candidate" 2>/dev/null | head -1 | cut -d: -f1) && [[ -n $package ]] && break
  done
  if [[ -z $package ]]; then
    # The soname is a symlink owned by the package that ships the real file.
    real=$(readlink -f "$path")
    for candidate in "$real" "${real#/usr}"; do
      package=$(dpkg -S "$candidate" 2>/dev/null | head -1 | cut -d: -f1) && [[ -n $package ]] && break
    done
  fi
  [[ -n $package ]] || { echo "FAIL: no Debian package owns $path ($soname)"; exit 1; }
  echo "$soname -> $path -> $package"
  pairs+="$soname $package"$'\n'
done

/usr/bin/python3 - "$containerfile" "$pairs" <<'PY'
import re
import sys

path, pairs = sys.argv[1], sys.argv[2]
text = open(path).read()
# Join continuation lines, drop comments.
logical = []
current = ""
for raw in text.splitlines():
    line = raw.strip()
    if not line or line.startswith("#"):
        continue
    if line.endswith("\\"):
        current += line[:-1] + " "
        continue
    logical.append(current + line)
    current = ""

stages = []
for line in logical:
    word = line.split(None, 1)[0].upper()
    if word == "FROM":
        stages.append([line])
    elif stages:
        stages[-1].append(line)
failures = []
if len(stages) < 2:
    failures.append(f"{path}: expected a multi-stage build (build and runtime), found {len(stages)} stage(s)")
    stages = stages + [[""]] * (2 - len(stages))
build, runtime = stages[0], stages[-1]
if not re.match(r"FROM\s+debian:bookworm(\s|$)", build[0], re.I):
    failures.append(f"build stage must start FROM debian:bookworm, found: {build[0]}")
if not re.match(r"FROM\s+debian:bookworm-slim(\s|$)", runtime[0], re.I):
    failures.append(f"runtime stage must start FROM debian:bookworm-slim, found: {runtime[0]}")
build_text = "\n".join(build)
for fragment in ("-DCMAKE_BUILD_TYPE=Release", "-DKMSPLUGIN_TESTS=OFF", "-DKMSPLUGIN_BENCH=OFF", "--target kmsplugin"):
    if fragment not in build_text:
        failures.append(f"build stage does not build with {fragment}")
if "install-deps.sh build" not in build_text:
    failures.append("build stage does not install deploy/install-deps.sh's build packages")

installed = set()
for line in runtime:
    for command in re.split(r"&&|;", line):
        words = command.split()
        if "apt-get" in words and "install" in words:
            for word in words[words.index("install") + 1:]:
                if not word.startswith("-"):
                    installed.add(word)
print("runtime stage installs:", " ".join(sorted(installed)))
for pair in pairs.strip().splitlines():
    soname, package = pair.split()
    if package not in installed:
        failures.append(f"runtime stage does not install {package}, which ships {soname} (NEEDED by the binary)")

users = [l.split(None, 1)[1].strip() for l in runtime if l.split(None, 1)[0].upper() == "USER"]
if not users:
    failures.append("runtime stage has no USER: the image would run as root")
else:
    user = users[-1].split(":")[0]
    if user in ("0", "root") or not user.isdigit():
        failures.append(f"USER must be a fixed numeric non-root uid (the static pod's runAsUser), found {users[-1]}")
    elif user != "65532":
        failures.append(f"USER {user} differs from the static pod's runAsUser 65532")
entry = [l for l in runtime if l.split(None, 1)[0].upper() == "ENTRYPOINT"]
if not entry or "/usr/local/bin/kmsplugin" not in entry[-1]:
    failures.append("runtime ENTRYPOINT must be /usr/local/bin/kmsplugin")
copies = [l for l in runtime if l.upper().startswith("COPY") and "--from=" in l and "/usr/local/bin/kmsplugin" in l]
if not copies:
    failures.append("runtime stage does not copy the binary from the build stage to /usr/local/bin/kmsplugin")

# OCI labels, and the version label's default equal to the one version of the project (CMakeLists.txt).
import os
source_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
project = re.search(r"project\(kmsplugin VERSION ([0-9.]+)", open(os.path.join(source_dir, "CMakeLists.txt")).read())
arg = re.search(r"^ARG KMSPLUGIN_VERSION=(\S+)$", text, re.M)
if not project or not arg or arg.group(1) != project.group(1):
    failures.append(f"ARG KMSPLUGIN_VERSION ({arg and arg.group(1)}) must equal CMakeLists.txt's project version "
                    f"({project and project.group(1)})")
for label in ("title", "description", "version", "licenses"):
    if f"org.opencontainers.image.{label}=" not in text:
        failures.append(f"runtime stage lacks the OCI label org.opencontainers.image.{label}")
if 'org.opencontainers.image.licenses="Apache-2.0"' not in text:
    failures.append("the licenses label must say Apache-2.0 (LICENSE)")
# podman/buildah (.containerignore) and BuildKit (Containerfile.dockerignore) filter the context alike.
def patterns(p):
    return sorted(l.strip() for l in open(p) if l.strip() and not l.startswith("#"))
ignore_oci = os.path.join(source_dir, ".containerignore")
ignore_buildkit = path + ".dockerignore"
if not os.path.exists(ignore_oci) or patterns(ignore_oci) != patterns(ignore_buildkit):
    failures.append(".containerignore (podman, buildah) and Containerfile.dockerignore (BuildKit) must list the "
                    "same patterns")

for failure in failures:
    print("FAIL:", failure)
if failures:
    sys.exit(1)
print(f"OK: {path}: runtime stage covers every NEEDED library and runs as a non-root user")
PY
