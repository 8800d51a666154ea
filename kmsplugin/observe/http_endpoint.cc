#include "kmsplugin/observe/http_endpoint.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <set>

#include <httplib.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace kmsplugin::observe {
namespace {

// Set while a connection is handed to process_and_close_socket only to be closed (over the limit, or stopping).
thread_local bool t_refuse = false;

void CloseConnection(int sock) {
  shutdown(sock, SHUT_RDWR);
  close(sock);
}

// httplib's own SocketStream applies its read timeout to each read, so a client that trickles a byte before each
// timeout holds a worker for ever; this Stream has one deadline for the whole exchange and a byte budget. With
// `ssl` (a non-blocking socket), the TLS handshake, every read and every write run against that same deadline.
class DeadlineStream final : public httplib::Stream {
 public:
  DeadlineStream(int sock, absl::Time deadline, size_t max_read, SSL* ssl = nullptr)
      : sock_(sock), deadline_(deadline), max_read_(max_read), ssl_(ssl) {}

  // The server side of the TLS handshake (client certificate verified), within the deadline.
  bool Handshake() {
    while (true) {
      const int result = SSL_accept(ssl_);
      if (result == 1) {
        return true;
      }
      if (!WaitFor(SSL_get_error(ssl_, result))) {
        ERR_clear_error();
        return false;
      }
    }
  }

  bool is_readable() const override {
    return begin_ < end_ || (ssl_ != nullptr && SSL_pending(ssl_) > 0) || Wait(POLLIN);
  }
  bool is_writable() const override { return Wait(POLLOUT); }

  ssize_t read(char* ptr, size_t size) override {
    if (begin_ == end_) {
      if (read_ >= max_read_ || (ssl_ == nullptr && !Wait(POLLIN))) {
        return -1;
      }
      const ssize_t n = Receive(std::min(sizeof(buffer_), max_read_ - read_));
      if (n <= 0) {
        return n;
      }
      read_ += static_cast<size_t>(n);
      begin_ = 0;
      end_ = static_cast<size_t>(n);
    }
    const size_t n = std::min(size, end_ - begin_);
    std::memcpy(ptr, buffer_ + begin_, n);
    begin_ += n;
    return static_cast<ssize_t>(n);
  }

  ssize_t write(const char* ptr, size_t size) override {
    if (ssl_ != nullptr) {
      while (true) {
        size_t written = 0;
        const int result = SSL_write_ex(ssl_, ptr, size, &written);
        if (result == 1) {
          return static_cast<ssize_t>(written);
        }
        if (!WaitFor(SSL_get_error(ssl_, result))) {
          ERR_clear_error();
          return -1;
        }
      }
    }
    if (!Wait(POLLOUT)) {
      return -1;
    }
    return send(sock_, ptr, size, MSG_NOSIGNAL);
  }

  void get_remote_ip_and_port(std::string& ip, int& port) const override { Address(getpeername, ip, port); }
  void get_local_ip_and_port(std::string& ip, int& port) const override { Address(getsockname, ip, port); }
  socket_t socket() const override { return sock_; }

 private:
  // One read into buffer_: after poll for a plain socket; through OpenSSL (which may need to write, too) for TLS.
  ssize_t Receive(size_t size) {
    if (ssl_ == nullptr) {
      return recv(sock_, buffer_, size, 0);
    }
    while (true) {
      size_t got = 0;
      const int result = SSL_read_ex(ssl_, buffer_, size, &got);
      if (result == 1) {
        return static_cast<ssize_t>(got);
      }
      const int error = SSL_get_error(ssl_, result);
      if (error == SSL_ERROR_ZERO_RETURN) {
        return 0;
      }
      if (!WaitFor(error)) {
        ERR_clear_error();
        return -1;
      }
    }
  }

  // After an OpenSSL call that did not complete: waits (until the deadline) for what it wants; false otherwise.
  bool WaitFor(int ssl_error) const {
    if (ssl_error == SSL_ERROR_WANT_READ) {
      return Wait(POLLIN);
    }
    if (ssl_error == SSL_ERROR_WANT_WRITE) {
      return Wait(POLLOUT);
    }
    return false;
  }

  // Waits for `events` until the deadline (EINTR is retried against the same deadline).
  bool Wait(short events) const {
    while (true) {
      const int64_t ms = absl::ToInt64Milliseconds(deadline_ - absl::Now());
      if (ms <= 0) {
        return false;
      }
      pollfd fd{sock_, events, 0};
      const int ready = poll(&fd, 1, static_cast<int>(ms));
      if (ready > 0) {
        return true;
      }
      if (ready == 0 || errno != EINTR) {
        return false;
      }
    }
  }

  void Address(int (*query)(int, sockaddr*, socklen_t*), std::string& ip, int& port) const {
    sockaddr_storage address{};
    socklen_t length = sizeof(address);
    char text[INET6_ADDRSTRLEN] = {};
    port = 0;
    if (query(sock_, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
      return;
    }
    if (address.ss_family == AF_INET) {
      const auto* in = reinterpret_cast<const sockaddr_in*>(&address);
      inet_ntop(AF_INET, &in->sin_addr, text, sizeof(text));
      port = ntohs(in->sin_port);
    } else if (address.ss_family == AF_INET6) {
      const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&address);
      inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof(text));
      port = ntohs(in6->sin6_port);
    }
    ip = text;
  }

  const int sock_;
  const absl::Time deadline_;
  const size_t max_read_;
  SSL* const ssl_;
  size_t read_ = 0;
  char buffer_[4096];
  size_t begin_ = 0;
  size_t end_ = 0;
};

// httplib 0.11's ThreadPool queues without bound; this one grows to `workers` threads and holds at most
// `max_held` connections (served or waiting). One more is run at once on the accept thread in refuse mode, which
// closes it (httplib's TaskQueue has no way to refuse a job, and the job owns the socket).
class BoundedQueue final : public httplib::TaskQueue {
 public:
  BoundedQueue(int workers, int max_held, std::atomic<uint64_t>* refused)
      : workers_(workers), max_held_(max_held), refused_(refused) {}

  void enqueue(std::function<void()> fn) override {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (!stopping_ && static_cast<int>(jobs_.size()) + busy_ < max_held_) {
        jobs_.push_back(std::move(fn));
        if (idle_ == 0 && static_cast<int>(threads_.size()) < workers_) {
          threads_.emplace_back([this] { Work(); });
        }
        cv_.notify_one();
        return;
      }
    }
    refused_->fetch_add(1);
    t_refuse = true;
    fn();
    t_refuse = false;
  }

  void shutdown() override {
    {
      std::unique_lock<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (std::thread& thread : threads_) {
      thread.join();
    }
  }

 private:
  void Work() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      ++idle_;
      cv_.wait(lock, [this] { return !jobs_.empty() || stopping_; });
      --idle_;
      if (jobs_.empty()) {
        return;  // stopping
      }
      std::function<void()> job = std::move(jobs_.front());
      jobs_.pop_front();
      ++busy_;
      const bool refuse = stopping_;
      lock.unlock();
      t_refuse = refuse;
      job();
      t_refuse = false;
      lock.lock();
      --busy_;
    }
  }

  const int workers_;
  const int max_held_;
  std::atomic<uint64_t>* const refused_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  std::vector<std::thread> threads_;  // only the accept thread (enqueue, shutdown) touches it
  int idle_ = 0;
  int busy_ = 0;
  bool stopping_ = false;
};

}  // namespace

class HttpEndpoint::Server final : public httplib::Server {
 public:
  explicit Server(HttpLimits limits) : limits(limits) {}
  const HttpLimits limits;
  std::atomic<uint64_t> refused{0};
  std::atomic<uint64_t> tls_failures{0};

  void SetTls(std::shared_ptr<const TlsServerContext> tls) {
    std::lock_guard<std::mutex> lock(mu_);
    tls_ = std::move(tls);
  }

  // Closes every connection being served (their reads and writes fail at once) and every later one.
  void CloseConnections() {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    for (int sock : active_) {
      shutdown(sock, SHUT_RDWR);
    }
  }

 private:
  // httplib calls this (a virtual) for each accepted socket, on a task queue thread.
  bool process_and_close_socket(socket_t sock) override {
    if (t_refuse || !Track(sock)) {
      CloseConnection(sock);
      return false;
    }
    const absl::Time deadline = absl::Now() + limits.request_deadline;
    std::shared_ptr<const TlsServerContext> tls;
    {
      std::lock_guard<std::mutex> lock(mu_);
      tls = tls_;  // this connection keeps the context it started with, even if a reload replaces it
    }
    bool ok = false;
    if (tls == nullptr) {
      DeadlineStream stream(sock, deadline, limits.max_request_bytes);
      bool closed = false;
      ok = process_request(stream, /*close_connection=*/true, closed, [](httplib::Request&) {});
    } else {
      ok = ServeTls(sock, *tls, deadline);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      active_.erase(sock);
    }
    CloseConnection(sock);
    return ok;
  }

  // The handshake is inside the exchange's deadline: a client that never finishes it is cut off like a silent
  // one, and holds a worker no longer. A client without a certificate from the client CA fails the handshake.
  bool ServeTls(int sock, const TlsServerContext& tls, absl::Time deadline) {
    // OpenSSL writes with write(), not send(MSG_NOSIGNAL): a client gone mid-answer would raise SIGPIPE, whose
    // default kills the process. Blocked on this worker (ours alone), and a pending one is taken back after.
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, nullptr);
    struct ConsumePipe {
      const sigset_t& set;
      ~ConsumePipe() {
        const timespec now{};
        while (sigtimedwait(&set, nullptr, &now) == SIGPIPE) {
        }
      }
    } consume{pipe};
    const int flags = fcntl(sock, F_GETFL);
    if (flags < 0 || fcntl(sock, F_SETFL, flags | O_NONBLOCK) != 0) {
      return false;
    }
    std::unique_ptr<SSL, void (*)(SSL*)> ssl(SSL_new(tls.get()), SSL_free);
    if (ssl == nullptr || SSL_set_fd(ssl.get(), sock) != 1) {
      ERR_clear_error();
      return false;
    }
    DeadlineStream stream(sock, deadline, limits.max_request_bytes, ssl.get());
    if (!stream.Handshake()) {
      tls_failures.fetch_add(1);
      return false;
    }
    bool closed = false;
    const bool ok = process_request(stream, /*close_connection=*/true, closed, [](httplib::Request&) {});
    SSL_shutdown(ssl.get());  // one close_notify, not waited for (the socket is non-blocking)
    ERR_clear_error();
    return ok;
  }

  bool Track(int sock) {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) {
      return false;
    }
    active_.insert(sock);
    return true;
  }

  std::shared_ptr<const TlsServerContext> tls_;  // under mu_; null for plain HTTP

  std::mutex mu_;
  std::set<int> active_;
  bool stopping_ = false;
};

absl::StatusOr<std::unique_ptr<HttpEndpoint>> HttpEndpoint::Start(const std::string& listen, const Registry& registry,
                                                                  std::function<std::vector<Readiness>()> readiness,
                                                                  std::function<std::vector<Readiness>()> liveness,
                                                                  HttpLimits limits,
                                                                  std::shared_ptr<const TlsServerContext> tls) {
  const size_t colon = listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos || colon == 0 || !absl::SimpleAtoi(listen.substr(colon + 1), &port) || port < 0 ||
      port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("http listen address \"", listen, "\" is not HOST:PORT; fix: write e.g. 127.0.0.1:9880"));
  }
  std::string host = listen.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  std::unique_ptr<HttpEndpoint> endpoint(new HttpEndpoint());
  endpoint->server_ = std::make_unique<Server>(limits);
  Server& server = *endpoint->server_;
  endpoint->tls_ = tls != nullptr;
  server.SetTls(std::move(tls));
  server.new_task_queue = [&server] {
    return new BoundedQueue(server.limits.workers, server.limits.max_connections, &server.refused);
  };
  // Only GETs are served: no request body is worth reading.
  server.set_payload_max_length(4096);
  // httplib's default also sets SO_REUSEPORT, which would let another process share (and answer on) our port.
  // SO_REUSEADDR alone keeps quick restarts working; a second listener on the port is refused.
  server.set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  server.Get("/metrics", [&registry](const httplib::Request&, httplib::Response& response) {
    response.set_content(registry.Render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  server.Get("/healthz", [liveness](const httplib::Request&, httplib::Response& response) {
    std::string body;
    bool alive = true;
    if (liveness) {
      for (const Readiness& part : liveness()) {
        if (!part.ready) {
          alive = false;
          absl::StrAppend(&body, part.environment, ": ", part.reason, "\n");
        }
      }
    }
    response.status = alive ? 200 : 503;
    response.set_content(alive ? std::string("ok\n") : body, "text/plain");
  });
  server.Get("/readyz", [readiness](const httplib::Request&, httplib::Response& response) {
    bool all_ready = true;
    std::string body;
    for (const Readiness& env : readiness()) {
      all_ready = all_ready && env.ready;
      absl::StrAppend(&body, env.environment, ": ", env.ready ? "ok" : env.reason, "\n");
    }
    response.status = all_ready ? 200 : 503;
    response.set_content(body, "text/plain");
  });
  if (port == 0) {
    port = server.bind_to_any_port(host);
  } else if (!server.bind_to_port(host, port)) {
    port = -1;
  }
  if (port <= 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for HTTP on ", listen,
                                               "; fix: choose a free address in http.listen"));
  }
  endpoint->port_ = port;
  endpoint->thread_ = std::thread([&server] { server.listen_after_bind(); });
  // stop() before the listener loop is running would be lost and leave the thread listening forever; return only
  // once it runs.
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (!server.is_running() && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  return endpoint;
}

uint64_t HttpEndpoint::refused() const { return server_->refused.load(); }

uint64_t HttpEndpoint::tls_handshake_failures() const { return server_->tls_failures.load(); }

void HttpEndpoint::SetTls(std::shared_ptr<const TlsServerContext> tls) {
  if (tls_ && tls != nullptr) {
    server_->SetTls(std::move(tls));
  }
}

HttpEndpoint::~HttpEndpoint() {
  if (server_ != nullptr) {
    server_->CloseConnections();
    server_->stop();
  }
  if (thread_.joinable()) {
    thread_.join();
  }
}

}  // namespace kmsplugin::observe
