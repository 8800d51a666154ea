#pragma once

// ServerTuning: the gRPC server settings every kmsplugin socket uses, in one place so the benchmark's null
// baseline server (bench/) runs on exactly the same gRPC stack.
//
// - Callback server (gRPC's callback API): gRPC's own threads only move bytes and answer Status/Version inline;
//   they are few and long-lived. Encrypt and Decrypt with a backend key source (vault, pkcs11; the local keyring
//   is answered inline) run on a CallPool of `workers` threads per socket, started
//   once, with at most `max_queued_calls` more waiting; beyond that a call gets RESOURCE_EXHAUSTED at once. (The
//   synchronous server this replaces created and destroyed a thread for about every third call, and refused
//   even Status with "Server Threadpool Exhausted" when its threads were busy.)
// - Requests are tiny (a 32-byte seed, a ciphertext of at most 1 KiB, annotations of at most 32 KiB), so the
//   receive limit is small; gRPC answers a larger message with RESOURCE_EXHAUSTED before any handler runs (so
//   that refusal is gRPC's own: it cannot be counted in kmsplugin_grpc_requests_total).
// - No `:authority` check anywhere: kube-apiserver before 1.32, and for v1beta1 always, sends the socket path.

#include <string>

#include <grpcpp/server_builder.h>

namespace kmsplugin::server {

struct ServerTuning {
  // Kept for the settings the key sources take from server.maxThreads (the PKCS#11 session pool); the gRPC
  // callback server itself has no thread quota to set.
  int max_threads = 128;
  // Encrypt/Decrypt calls that run at once per socket (server.workers). Each may hold a worker for up to the
  // call's deadline on a slow backend; kube-apiserver makes few concurrent calls (one seed per key_id).
  int workers = 16;
  // Encrypt/Decrypt calls that may wait for a worker per socket (server.maxQueuedCalls).
  int max_queued_calls = 128;
  int max_receive_bytes = 64 * 1024;      // larger requests get RESOURCE_EXHAUSTED
  int max_send_bytes = 64 * 1024;
};

// Applies `tuning` to `builder`. Call before BuildAndStart().
void ApplyServerTuning(const ServerTuning& tuning, grpc::ServerBuilder& builder);

}  // namespace kmsplugin::server
