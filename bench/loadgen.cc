// kms_loadgen: closed-loop load generator for a KMS v2 / v1beta1 plugin on a Unix socket.
//
// N worker threads each own one gRPC channel (distinct `grpc.channel_id` plus a local subchannel pool, so each
// worker gets its own HTTP/2 connection instead of all of them multiplexing one) and issue the next call as soon
// as the previous one returns. The first `--warmup` seconds are not measured; the next `--duration` seconds are.
// A call counts in the measurement when it completes inside the measured window.
//
// For decrypt (v2 and v1), one Encrypt is made before the run and its ciphertext (with key_id and annotations)
// is replayed by every call.
//
// Output: exactly one JSON line on stdout:
//   {"op","concurrency","duration_s","ops","errors","ops_per_sec","p50_us","p99_us","p999_us","max_us",
//    "calls_total","errors_by_code","client_cpu_us_per_call"}
// `ops` counts successful calls in the window and the latency figures cover those only; `calls_total` counts
// every call the process made (warmup, setup and window), so a caller sampling server CPU time around the whole
// process can divide by it; `client_cpu_us_per_call` is this process's own CPU time over `calls_total` (the
// client shares the machine with the server, so its cost matters when reading the figures). Diagnostics go to stderr. Exit status: 0 on success, 1 when no call in the window
// succeeded, 2 on bad flags or when the server is unreachable.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <grpcpp/grpcpp.h>
#include <sys/resource.h>

#include "kms_v1beta1.grpc.pb.h"
#include "kms_v2.grpc.pb.h"

namespace {

using Clock = std::chrono::steady_clock;

enum class Op { kEncrypt, kDecrypt, kStatus, kV1Encrypt, kV1Decrypt };

constexpr int kNumStatusCodes = 17;  // grpc::StatusCode values 0..16

struct Options {
  std::string socket;
  std::string op_name = "encrypt";
  Op op = Op::kEncrypt;
  int concurrency = 1;
  double duration_s = 5.0;
  double warmup_s = 1.0;
  int payload_bytes = 32;
  int timeout_ms = 3000;  // kube-apiserver's default per-call deadline
};

// What every call replays: the plaintext for Encrypt, the ciphertext (and key_id, annotations) for Decrypt.
struct Fixture {
  std::string plaintext;
  v2::DecryptRequest v2_decrypt;
  v1beta1::DecryptRequest v1_decrypt;
};

// Per-worker results; merged after the threads join.
struct WorkerResult {
  std::vector<uint32_t> latencies_ns;  // successful calls in the window (a call is < 3 s, fits in 32 bits)
  uint64_t errors = 0;                 // failed calls in the window
  uint64_t calls_total = 0;            // every call, warmup included
  uint64_t errors_by_code[kNumStatusCodes] = {};
};

const char* CodeName(int code) {
  static const char* const kNames[kNumStatusCodes] = {
      "OK",        "CANCELLED",         "UNKNOWN",           "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
      "NOT_FOUND", "ALREADY_EXISTS",    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED",   "OUT_OF_RANGE",      "UNIMPLEMENTED",     "INTERNAL",         "UNAVAILABLE",
      "DATA_LOSS", "UNAUTHENTICATED"};
  return (code >= 0 && code < kNumStatusCodes) ? kNames[code] : "UNKNOWN";
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& socket, int channel_id) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt("grpc.channel_id", channel_id);
  args.SetMaxReceiveMessageSize(1 << 20);
  return grpc::CreateCustomChannel("unix:" + socket, grpc::InsecureChannelCredentials(), args);
}

// A uid in the shape kube-apiserver sends (a 36-character UUID), cheap to build.
std::string MakeUid(int worker, uint64_t n) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%08x-0000-4000-8000-%012" PRIx64, static_cast<unsigned>(worker), n);
  return buf;
}

void SetDeadline(grpc::ClientContext& ctx, const Options& opt) {
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(opt.timeout_ms));
}

// One call of `opt.op`; returns its status.
grpc::Status DoCall(const Options& opt, const Fixture& fx, v2::KeyManagementService::Stub* v2_stub,
                    v1beta1::KeyManagementService::Stub* v1_stub, int worker, uint64_t n) {
  grpc::ClientContext ctx;
  SetDeadline(ctx, opt);
  switch (opt.op) {
    case Op::kEncrypt: {
      v2::EncryptRequest req;
      req.set_plaintext(fx.plaintext);
      req.set_uid(MakeUid(worker, n));
      v2::EncryptResponse resp;
      return v2_stub->Encrypt(&ctx, req, &resp);
    }
    case Op::kDecrypt: {
      v2::DecryptRequest req = fx.v2_decrypt;
      req.set_uid(MakeUid(worker, n));
      v2::DecryptResponse resp;
      return v2_stub->Decrypt(&ctx, req, &resp);
    }
    case Op::kStatus: {
      v2::StatusRequest req;
      v2::StatusResponse resp;
      return v2_stub->Status(&ctx, req, &resp);
    }
    case Op::kV1Encrypt: {
      v1beta1::EncryptRequest req;
      req.set_version("v1beta1");
      req.set_plain(fx.plaintext);
      v1beta1::EncryptResponse resp;
      return v1_stub->Encrypt(&ctx, req, &resp);
    }
    case Op::kV1Decrypt: {
      v1beta1::DecryptResponse resp;
      return v1_stub->Decrypt(&ctx, fx.v1_decrypt, &resp);
    }
  }
  return grpc::Status(grpc::StatusCode::INTERNAL, "unknown op");
}

// Builds the fixture; for decrypt ops makes the one Encrypt whose result is replayed. Returns false on failure.
bool Prepare(const Options& opt, const std::shared_ptr<grpc::Channel>& channel, Fixture& fx, uint64_t& calls) {
  std::mt19937_64 rng(12345);
  fx.plaintext.resize(opt.payload_bytes);
  for (char& c : fx.plaintext) {
    c = static_cast<char>(rng());
  }
  if (opt.op == Op::kDecrypt) {
    auto stub = v2::KeyManagementService::NewStub(channel);
    grpc::ClientContext ctx;
    SetDeadline(ctx, opt);
    v2::EncryptRequest req;
    req.set_plaintext(fx.plaintext);
    req.set_uid(MakeUid(0xffffffff, 0));
    v2::EncryptResponse resp;
    grpc::Status s = stub->Encrypt(&ctx, req, &resp);
    ++calls;
    if (!s.ok()) {
      std::fprintf(stderr, "kms_loadgen: setup Encrypt failed: %s: %s\n", CodeName(s.error_code()),
                   s.error_message().c_str());
      return false;
    }
    fx.v2_decrypt.set_ciphertext(resp.ciphertext());
    fx.v2_decrypt.set_key_id(resp.key_id());
    fx.v2_decrypt.mutable_annotations()->insert(resp.annotations().begin(), resp.annotations().end());
  }
  if (opt.op == Op::kV1Encrypt || opt.op == Op::kV1Decrypt) {
    // kube-apiserver calls Version once before anything else on v1beta1.
    auto stub = v1beta1::KeyManagementService::NewStub(channel);
    {
      grpc::ClientContext ctx;
      SetDeadline(ctx, opt);
      v1beta1::VersionRequest req;
      req.set_version("v1beta1");
      v1beta1::VersionResponse resp;
      grpc::Status s = stub->Version(&ctx, req, &resp);
      ++calls;
      if (!s.ok()) {
        std::fprintf(stderr, "kms_loadgen: setup Version failed: %s: %s\n", CodeName(s.error_code()),
                     s.error_message().c_str());
        return false;
      }
    }
    if (opt.op == Op::kV1Decrypt) {
      grpc::ClientContext ctx;
      SetDeadline(ctx, opt);
      v1beta1::EncryptRequest req;
      req.set_version("v1beta1");
      req.set_plain(fx.plaintext);
      v1beta1::EncryptResponse resp;
      grpc::Status s = stub->Encrypt(&ctx, req, &resp);
      ++calls;
      if (!s.ok()) {
        std::fprintf(stderr, "kms_loadgen: setup v1 Encrypt failed: %s: %s\n", CodeName(s.error_code()),
                     s.error_message().c_str());
        return false;
      }
      fx.v1_decrypt.set_version("v1beta1");
      fx.v1_decrypt.set_cipher(resp.cipher());
    }
  }
  return true;
}

void Worker(const Options& opt, const Fixture& fx, std::shared_ptr<grpc::Channel> channel, int worker,
            Clock::time_point measure_start, Clock::time_point measure_end, WorkerResult& out) {
  auto v2_stub = v2::KeyManagementService::NewStub(channel);
  auto v1_stub = v1beta1::KeyManagementService::NewStub(channel);
  // Generous reservation so the hot loop does not reallocate (grown on demand beyond it).
  out.latencies_ns.reserve(1 << 16);
  uint64_t n = 0;
  for (;;) {
    const Clock::time_point t0 = Clock::now();
    if (t0 >= measure_end) {
      break;
    }
    grpc::Status s = DoCall(opt, fx, v2_stub.get(), v1_stub.get(), worker, n++);
    const Clock::time_point t1 = Clock::now();
    ++out.calls_total;
    if (t1 < measure_start || t1 >= measure_end) {
      continue;
    }
    if (s.ok()) {
      const int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count();
      out.latencies_ns.push_back(static_cast<uint32_t>(std::min<int64_t>(ns, UINT32_MAX)));
    } else {
      ++out.errors;
      ++out.errors_by_code[static_cast<int>(s.error_code()) % kNumStatusCodes];
    }
  }
}

// Nearest-rank percentile of a sorted vector, in microseconds.
double PercentileUs(const std::vector<uint32_t>& sorted, double p) {
  if (sorted.empty()) {
    return 0.0;
  }
  size_t rank = static_cast<size_t>(std::ceil(p * static_cast<double>(sorted.size())));
  rank = std::clamp<size_t>(rank, 1, sorted.size());
  return sorted[rank - 1] / 1000.0;
}

bool ParseOp(const std::string& name, Op& op) {
  static const std::map<std::string, Op> kOps = {{"encrypt", Op::kEncrypt},
                                                 {"decrypt", Op::kDecrypt},
                                                 {"status", Op::kStatus},
                                                 {"v1encrypt", Op::kV1Encrypt},
                                                 {"v1decrypt", Op::kV1Decrypt}};
  auto it = kOps.find(name);
  if (it == kOps.end()) {
    return false;
  }
  op = it->second;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  CLI::App app{"kms_loadgen: closed-loop load generator for a KMS plugin on a Unix socket"};
  app.add_option("--socket", opt.socket, "Unix socket path of the plugin (no unix: prefix)")->required();
  app.add_option("--op", opt.op_name, "encrypt|decrypt|status|v1encrypt|v1decrypt")
      ->check(CLI::IsMember({"encrypt", "decrypt", "status", "v1encrypt", "v1decrypt"}));
  app.add_option("--concurrency", opt.concurrency, "concurrent workers (one channel each)")
      ->check(CLI::Range(1, 4096));
  app.add_option("--duration", opt.duration_s, "measured seconds")->check(CLI::Range(0.1, 86400.0));
  app.add_option("--warmup", opt.warmup_s, "unmeasured seconds before the measurement")->check(CLI::Range(0.0, 3600.0));
  app.add_option("--payload-bytes", opt.payload_bytes, "plaintext size for Encrypt")->check(CLI::Range(1, 65536));
  app.add_option("--timeout-ms", opt.timeout_ms, "per-call deadline")->check(CLI::Range(1, 600000));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  ParseOp(opt.op_name, opt.op);

  std::vector<std::shared_ptr<grpc::Channel>> channels;
  channels.reserve(opt.concurrency);
  for (int i = 0; i < opt.concurrency; ++i) {
    channels.push_back(MakeChannel(opt.socket, i));
    if (!channels.back()->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(5))) {
      std::fprintf(stderr, "kms_loadgen: cannot connect to unix:%s\n", opt.socket.c_str());
      return 2;
    }
  }

  Fixture fx;
  uint64_t setup_calls = 0;
  if (!Prepare(opt, channels[0], fx, setup_calls)) {
    return 2;
  }

  const Clock::time_point start = Clock::now();
  const Clock::time_point measure_start =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(opt.warmup_s));
  const Clock::time_point measure_end =
      measure_start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(opt.duration_s));

  std::vector<WorkerResult> results(opt.concurrency);
  std::vector<std::thread> threads;
  threads.reserve(opt.concurrency);
  for (int i = 0; i < opt.concurrency; ++i) {
    threads.emplace_back(Worker, std::cref(opt), std::cref(fx), channels[i], i, measure_start, measure_end,
                         std::ref(results[i]));
  }
  for (auto& t : threads) {
    t.join();
  }

  std::vector<uint32_t> all;
  uint64_t errors = 0;
  uint64_t calls_total = setup_calls;
  uint64_t by_code[kNumStatusCodes] = {};
  size_t total = 0;
  for (const auto& r : results) {
    total += r.latencies_ns.size();
  }
  all.reserve(total);
  for (const auto& r : results) {
    all.insert(all.end(), r.latencies_ns.begin(), r.latencies_ns.end());
    errors += r.errors;
    calls_total += r.calls_total;
    for (int c = 0; c < kNumStatusCodes; ++c) {
      by_code[c] += r.errors_by_code[c];
    }
  }
  std::sort(all.begin(), all.end());
  const uint64_t ops = all.size();

  std::string by_code_json = "{";
  for (int c = 0; c < kNumStatusCodes; ++c) {
    if (by_code[c] != 0) {
      if (by_code_json.size() > 1) {
        by_code_json += ",";
      }
      by_code_json += "\"" + std::string(CodeName(c)) + "\":" + std::to_string(by_code[c]);
    }
  }
  by_code_json += "}";

  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const double client_cpu_us = usage.ru_utime.tv_sec * 1e6 + usage.ru_utime.tv_usec + usage.ru_stime.tv_sec * 1e6 +
                               usage.ru_stime.tv_usec;

  std::printf(
      "{\"op\":\"%s\",\"concurrency\":%d,\"duration_s\":%.3f,\"ops\":%" PRIu64 ",\"errors\":%" PRIu64
      ",\"ops_per_sec\":%.1f,\"p50_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f,\"max_us\":%.1f,\"calls_total\":%" PRIu64
      ",\"errors_by_code\":%s,\"client_cpu_us_per_call\":%.1f}\n",
      opt.op_name.c_str(), opt.concurrency, opt.duration_s, ops, errors, ops / opt.duration_s,
      PercentileUs(all, 0.50), PercentileUs(all, 0.99), PercentileUs(all, 0.999),
      all.empty() ? 0.0 : all.back() / 1000.0, calls_total, by_code_json.c_str(),
      client_cpu_us / static_cast<double>(std::max<uint64_t>(calls_total, 1)));
  std::fflush(stdout);
  if (ops == 0) {
    std::fprintf(stderr, "kms_loadgen: no call succeeded in the measured window (%" PRIu64 " errors)\n", errors);
    return 1;
  }
  return 0;
}
