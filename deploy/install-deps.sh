#!/usr/bin/env bash
# Installs the Debian bookworm packages kmsplugin needs, and only those that are missing.
#   deploy/install-deps.sh build   # to build and run kmsplugin
#   deploy/install-deps.sh test    # also what the test suite needs (SoftHSM2, etcd, Python for the Vault test server)
set -euo pipefail

build_packages=(
  cmake g++ make pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  libssl-dev libsodium-dev libcurl4-openssl-dev libsystemd-dev
  nlohmann-json3-dev libyaml-cpp-dev libcli11-dev libspdlog-dev libcpp-httplib-dev libp11-kit-dev
  prometheus-cpp-dev  # the metric registry and text exposition (libprometheus-cpp-core; /metrics)
)
test_packages=(
  catch2 softhsm2 opensc openssl python3 python3-cryptography python3-yaml procps prometheus
  etcd-server etcd-client time systemd binutils
  passwd util-linux  # useradd/groupadd and setpriv: the non-root socket-group test (tests/integration/nonroot_test.cc)
  faketime  # libfaketime: wall-clock steps and a clock set to 2100 under the real binary (tests/integration/clock_test.cc)
  clang-14 libclang-rt-14-dev llvm-14  # libFuzzer builds (tests/fuzz/run.sh); FuzzedDataProvider.h for the fuzz targets in every test build
)

wanted=("${build_packages[@]}")
if [[ "${1:-build}" == "test" ]]; then
  wanted+=("${test_packages[@]}")
fi

missing=()
for package in "${wanted[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
echo "installing: ${missing[*]}"
sudo=""
if [[ $(id -u) -ne 0 ]]; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
