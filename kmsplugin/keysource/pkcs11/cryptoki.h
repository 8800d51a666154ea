#pragma once

// Internal to kmsplugin/keysource/pkcs11: the one header that includes <p11-kit/pkcs11.h>.
//
// p11-kit's compat API #defines lowercase names (`value`, `count`, `params`, `iv_len`, `hash_alg`, `reserved`,
// ...) so that its own field names read as the OASIS ones; any identifier of that name compiled after it is
// silently renamed. So:
// - Only the .cc files of this folder and the internal headers errors.h, module.h, session_pool.h and
//   token_keys.h include it; the headers other folders see (pkcs11_key_source.h, pkcs11_spec.h, key_ref.h) never
//   do, and CMake gives the p11-kit include directory to this library only (PRIVATE).
// - Every file that includes it (directly or through an internal header) includes all of its other headers
//   first: the internal headers come last in each include list.

// clang-format off
#include <p11-kit/pkcs11.h>
// clang-format on
