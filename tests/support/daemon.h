#pragma once

// DaemonDriver: drives the real kmsplugin binary as an operator does: commands run to completion, `serve` as a
// subprocess, Status over the socket, the HTTP port from the daemon's own log. Each integration suite derives its
// setup from it and writes `config` for its key source.

#include <signal.h>

#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "absl/time/clock.h"
#include "tests/support/kms_client.h"
#include "tests/support/subprocess.h"
#include "tests/support/temp_dir.h"

namespace kmsplugin::testing {

// The value of the sample `series` (name{labels}) in a /metrics body; -1 when absent.
inline double MetricSample(const std::string& metrics, const std::string& series) {
  std::istringstream lines(metrics);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.rfind(series + " ", 0) == 0) {
      return std::stod(line.substr(series.size() + 1));
    }
  }
  return -1;
}

// The daemon's JSON log lines whose msg is `msg` (every line when `msg` is empty).
inline std::vector<nlohmann::json> LogLines(const Subprocess& server, const std::string& msg) {
  std::vector<nlohmann::json> found;
  std::istringstream lines(server.Stderr());
  std::string line;
  while (std::getline(lines, line)) {
    if (nlohmann::json::accept(line)) {
      auto entry = nlohmann::json::parse(line);
      if (msg.empty() || entry.value("msg", "") == msg) {
        found.push_back(std::move(entry));
      }
    }
  }
  return found;
}

struct DaemonDriver {
  static std::string Binary() { return std::string(KMS_BINARY_DIR) + "/kmsplugin/cli/kmsplugin"; }

  RunResult Cli(std::vector<std::string> args) const {
    args.insert(args.begin(), Binary());
    return Run(args, dir.path());
  }
  RunResult Init() const { return Cli({"init", "--config", config}); }
  RunResult Rotate(const std::string& env) const { return Cli({"rotate", "--config", config, "--env", env}); }
  std::unique_ptr<Subprocess> Serve() const {
    return std::make_unique<Subprocess>(std::vector<std::string>{Binary(), "serve", "--config", config}, dir.path());
  }

  // Waits until `socket` answers Status (false if the daemon died or 6 s passed).
  static bool WaitServing(Subprocess& process, const std::string& socket) {
    for (int i = 0; i < 300; ++i) {
      KmsClient client(socket);
      v2::StatusResponse status;
      if (client.Status(status, std::chrono::milliseconds(100)).ok()) {
        return true;
      }
      if (!process.Running()) {
        return false;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    return false;
  }
  static v2::StatusResponse Status(const std::string& socket) {
    KmsClient client(socket);
    v2::StatusResponse status;
    REQUIRE(client.Status(status).ok());
    return status;
  }
  // Status key_id after SIGHUP, once it differs from `before` (or `before` after 2 s).
  static std::string KeyIdAfterHup(Subprocess& server, const std::string& socket, const std::string& before) {
    server.Signal(SIGHUP);
    std::string after = before;
    for (int i = 0; i < 100 && after == before; ++i) {
      absl::SleepFor(absl::Milliseconds(20));
      after = Status(socket).key_id();
    }
    return after;
  }
  // A key source that cannot start does not stop serve (README "Environments are isolated"): its environment
  // serves unhealthy, with the reason. Starts serve, waits for `socket`, returns its Status healthz and the log,
  // stops it with SIGTERM and checks exit 0.
  std::string ServeUnhealthy(const std::string& socket) const {
    auto server = Serve();
    const bool serving = WaitServing(*server, socket);
    INFO(server->Stderr());
    REQUIRE(serving);
    const std::string healthz = Status(socket).healthz();
    CHECK(healthz != "ok");
    server->Signal(SIGTERM);
    CHECK(server->Wait() == std::optional<int>(0));
    return healthz + "\n" + server->Stderr();
  }
  // The HTTP port the daemon logged ("http listening" ... "port":N); -1 if it never did.
  static int LoggedHttpPort(Subprocess& server) {
    for (int i = 0; i < 200; ++i) {
      std::istringstream lines(server.Stderr());
      std::string line;
      while (std::getline(lines, line)) {
        if (nlohmann::json::accept(line)) {
          const auto entry = nlohmann::json::parse(line);
          if (entry.value("msg", "") == "http listening") {
            return entry["port"].get<int>();
          }
        }
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    return -1;
  }
  // GET http://127.0.0.1:PORT/PATH; the body ("" on failure).
  static std::string HttpGet(int port, const std::string& path) {
    httplib::Client client("127.0.0.1", port);
    auto response = client.Get(path.c_str());
    return response ? response->body : std::string();
  }

  TempDir dir;
  std::string config;
};

}  // namespace kmsplugin::testing
