#include "kmsplugin/audit/etcd_client.h"

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

#include <grpcpp/create_channel.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/credentials.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kv.grpc.pb.h"

namespace kmsplugin::audit {
namespace {

// A page of 500 Secrets of up to 1.5 MiB each is far beyond gRPC's default 4 MiB receive limit.
constexpr int kMaxReceiveBytes = 1 << 30;

absl::StatusOr<std::string> ReadPem(const std::string& path, const std::string& flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int error = errno;
    const std::string problem = absl::StrCat(flag, " ", path, ": cannot read: ", std::strerror(error));
    return error == EACCES ? absl::PermissionDeniedError(problem) : absl::NotFoundError(problem);
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  std::string text = buffer.str();
  if (!absl::StrContains(text, "-----BEGIN ")) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, ": not a PEM file (no -----BEGIN line)"));
  }
  return text;
}

bool IsTransportFailure(grpc::StatusCode code) {
  return code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::DEADLINE_EXCEEDED;
}

absl::StatusCode ToAbsl(grpc::StatusCode code) { return static_cast<absl::StatusCode>(static_cast<int>(code)); }

struct Endpoint {
  std::string address;  // host:port
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<etcdserverpb::KV::Stub> stub;
};

}  // namespace

struct EtcdClient::Impl {
  EtcdOptions options;
  bool tls = false;
  std::vector<Endpoint> endpoints;
  size_t current = 0;
};

EtcdClient::EtcdClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
EtcdClient::~EtcdClient() = default;

const std::string& EtcdClient::endpoint() const { return impl_->endpoints[impl_->current].address; }
bool EtcdClient::tls() const { return impl_->tls; }

absl::StatusOr<std::unique_ptr<EtcdClient>> EtcdClient::New(const EtcdOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  if (options.endpoints.empty()) {
    return absl::InvalidArgumentError("no etcd endpoint given; fix: --endpoints host:port[,host:port]");
  }
  if (options.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("the etcd timeout must be greater than 0");
  }
  if (options.cert_file.empty() != options.key_file.empty()) {
    return absl::InvalidArgumentError("--cert and --key go together: give both (client certificate and its key)");
  }
  std::vector<std::string> addresses;
  bool any_https = false;
  bool any_http = false;
  for (const std::string& raw : options.endpoints) {
    std::string address(absl::StripAsciiWhitespace(raw));
    if (absl::StartsWith(address, "https://")) {
      any_https = true;
      address = address.substr(8);
    } else if (absl::StartsWith(address, "http://")) {
      any_http = true;
      address = address.substr(7);
    } else if (absl::StrContains(address, "://")) {
      return absl::InvalidArgumentError(
          absl::StrCat("etcd endpoint \"", raw, "\": unsupported scheme; use host:port, http:// or https://"));
    }
    while (!address.empty() && address.back() == '/') {
      address.pop_back();
    }
    const size_t colon = address.rfind(':');
    if (address.empty() || colon == std::string::npos || colon == 0 || colon + 1 == address.size() ||
        address.find('/') != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("etcd endpoint \"", raw, "\": expected host:port (e.g. 127.0.0.1:2379)"));
    }
    addresses.push_back(address);
  }
  impl->tls = any_https || !options.ca_file.empty() || !options.cert_file.empty();
  if (impl->tls && any_http) {
    return absl::InvalidArgumentError("etcd endpoints mix http:// with TLS (https:// or --cacert/--cert); use one");
  }

  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (impl->tls) {
    grpc::SslCredentialsOptions ssl;
    if (!options.ca_file.empty()) {
      auto ca = ReadPem(options.ca_file, "--cacert");
      if (!ca.ok()) {
        return ca.status();
      }
      ssl.pem_root_certs = *std::move(ca);
    }
    if (!options.cert_file.empty()) {
      auto cert = ReadPem(options.cert_file, "--cert");
      if (!cert.ok()) {
        return cert.status();
      }
      auto key = ReadPem(options.key_file, "--key");
      if (!key.ok()) {
        return key.status();
      }
      ssl.pem_cert_chain = *std::move(cert);
      ssl.pem_private_key = *std::move(key);
    }
    credentials = grpc::SslCredentials(ssl);
  } else {
    credentials = grpc::InsecureChannelCredentials();
  }
  for (const std::string& address : addresses) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, kMaxReceiveBytes);
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    Endpoint endpoint;
    endpoint.address = address;
    endpoint.channel = grpc::CreateCustomChannel(address, credentials, args);
    endpoint.stub = etcdserverpb::KV::NewStub(endpoint.channel);
    impl->endpoints.push_back(std::move(endpoint));
  }
  return std::unique_ptr<EtcdClient>(new EtcdClient(std::move(impl)));
}

absl::StatusOr<RangePage> EtcdClient::Range(const std::string& key, const std::string& range_end, int64_t limit,
                                            int64_t revision) {
  if (limit <= 0) {
    return absl::InvalidArgumentError("Range limit must be > 0");
  }
  etcdserverpb::RangeRequest request;
  request.set_key(key);
  request.set_range_end(range_end);
  request.set_limit(limit);
  request.set_revision(revision);
  // A read pinned to a revision this member already served needs no quorum round trip (a linearizable Range
  // costs one ReadIndex, ~25 ms per page); a lagging member after failover answers "future revision", never
  // stale data.
  request.set_serializable(revision > 0);
  std::vector<std::string> failures;
  const size_t n = impl_->endpoints.size();
  for (size_t attempt = 0; attempt < n; ++attempt) {
    const size_t index = (impl_->current + attempt) % n;
    Endpoint& endpoint = impl_->endpoints[index];
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::microseconds(absl::ToInt64Microseconds(impl_->options.timeout)));
    etcdserverpb::RangeResponse response;
    const grpc::Status status = endpoint.stub->Range(&context, request, &response);
    if (status.ok()) {
      impl_->current = index;
      RangePage page;
      page.more = response.more();
      page.count = response.count();
      page.revision = response.header().revision();
      page.kvs.reserve(response.kvs_size());
      for (mvccpb::KeyValue& kv : *response.mutable_kvs()) {
        page.kvs.push_back(EtcdKeyValue{std::move(*kv.mutable_key()), std::move(*kv.mutable_value()),
                                        kv.mod_revision()});
      }
      return page;
    }
    if (!IsTransportFailure(status.error_code())) {
      // etcd answered: the problem is the request (e.g. a compacted revision), not the endpoint.
      return absl::Status(ToAbsl(status.error_code()),
                          absl::StrCat("etcd at ", endpoint.address, " refused Range: ", status.error_message()));
    }
    std::string failure = absl::StrCat(endpoint.address, ": ", status.error_message());
    const std::string lower = absl::AsciiStrToLower(status.error_message());
    if (impl_->tls && (absl::StrContains(lower, "ssl") || absl::StrContains(lower, "handshake") ||
                       absl::StrContains(lower, "certificate") || absl::StrContains(lower, "tls"))) {
      absl::StrAppend(&failure, " (TLS handshake failed: check that --cacert signs etcd's server certificate, "
                                "that the certificate names this host, and --cert/--key if etcd wants a client "
                                "certificate)");
    } else if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
      absl::StrAppend(&failure, " (no answer within ", absl::FormatDuration(impl_->options.timeout), ")");
    }
    failures.push_back(std::move(failure));
  }
  return absl::UnavailableError(absl::StrCat("cannot reach etcd", impl_->tls ? " (TLS)" : "", ": ",
                                             absl::StrJoin(failures, "; "),
                                             "; fix: check --endpoints, that etcd is running",
                                             impl_->tls ? " and the TLS files" : "",
                                             impl_->tls ? "" : " (and whether it wants TLS: --cacert/--cert/--key)"));
}

std::string PrefixRangeEnd(const std::string& prefix) {
  std::string end = prefix;
  while (!end.empty()) {
    unsigned char last = static_cast<unsigned char>(end.back());
    if (last < 0xff) {
      end.back() = static_cast<char>(last + 1);
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');
}

}  // namespace kmsplugin::audit
