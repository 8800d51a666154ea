#include "crypto/secret_bytes.h"

#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "crypto/random.h"
#include "tests/support/fake_random.h"

namespace kmsplugin::crypto {
namespace {

static_assert(!std::is_copy_constructible_v<SecretBytes>, "a secret must never be copied by accident");
static_assert(!std::is_copy_assignable_v<SecretBytes>, "a secret must never be copied by accident");
static_assert(std::is_nothrow_move_constructible_v<SecretBytes>);
static_assert(std::is_nothrow_move_assignable_v<SecretBytes>);

bool AllZero(const SecretBytes& secret) {
  for (uint8_t b : secret.span()) {
    if (b != 0) {
      return false;
    }
  }
  return true;
}

TEST_CASE("SecretBytes: a default secret is empty and owns no memory") {
  SecretBytes secret;
  CHECK(secret.empty());
  CHECK(secret.size() == 0);
  CHECK(secret.data() == nullptr);
  CHECK(secret.view().empty());
}

TEST_CASE("SecretBytes: a sized secret starts zero-filled") {
  for (size_t size : {1u, 16u, 32u, 4096u, 5000u}) {
    SecretBytes secret(size);
    REQUIRE(secret.size() == size);
    CHECK_FALSE(secret.empty());
    CHECK(secret.data() != nullptr);
    CHECK(AllZero(secret));
  }
}

TEST_CASE("SecretBytes: size zero allocates nothing") {
  SecretBytes secret(0);
  CHECK(secret.empty());
  CHECK(secret.data() == nullptr);
}

TEST_CASE("SecretBytes: CopyOf copies the bytes exactly, including zeros") {
  const std::string bytes("\x00\x01\xff secret \x00", 12);
  SecretBytes from_view = SecretBytes::CopyOf(std::string_view(bytes));
  CHECK(from_view.view() == bytes);
  const uint8_t raw[] = {0xde, 0xad, 0x00, 0xbe, 0xef};
  SecretBytes from_span = SecretBytes::CopyOf(absl::MakeConstSpan(raw));
  REQUIRE(from_span.size() == sizeof(raw));
  CHECK(std::memcmp(from_span.data(), raw, sizeof(raw)) == 0);
}

TEST_CASE("SecretBytes: CopyOf owns its copy: changing the source does not change the secret") {
  std::string bytes = "0123456789abcdef";
  SecretBytes secret = SecretBytes::CopyOf(std::string_view(bytes));
  bytes[0] = 'X';
  CHECK(secret.view() == "0123456789abcdef");
}

TEST_CASE("SecretBytes: CopyOf of nothing gives an empty secret") {
  CHECK(SecretBytes::CopyOf(std::string_view()).empty());
  CHECK(SecretBytes::CopyOf(absl::Span<const uint8_t>()).empty());
}

TEST_CASE("SecretBytes: move construction transfers the bytes and empties the source") {
  SecretBytes source = SecretBytes::CopyOf(std::string_view("key material"));
  const uint8_t* original = source.data();
  SecretBytes target(std::move(source));
  CHECK(target.view() == "key material");
  CHECK(target.data() == original);
  CHECK(source.empty());  // NOLINT(bugprone-use-after-move): moved-from state is part of the contract
  CHECK(source.data() == nullptr);
}

TEST_CASE("SecretBytes: move assignment replaces the old secret and empties the source") {
  SecretBytes source = SecretBytes::CopyOf(std::string_view("new"));
  SecretBytes target = SecretBytes::CopyOf(std::string_view("old secret"));
  target = std::move(source);
  CHECK(target.view() == "new");
  CHECK(source.empty());  // NOLINT(bugprone-use-after-move)
  CHECK(source.data() == nullptr);
}

TEST_CASE("SecretBytes: self move-assignment keeps the bytes") {
  SecretBytes secret = SecretBytes::CopyOf(std::string_view("stay"));
  SecretBytes& alias = secret;
  secret = std::move(alias);
  CHECK(secret.view() == "stay");
}

TEST_CASE("SecretBytes: Equals is true for identical bytes") {
  SecretBytes a = SecretBytes::CopyOf(std::string_view("same bytes here"));
  SecretBytes b = SecretBytes::CopyOf(std::string_view("same bytes here"));
  CHECK(a.Equals(b));
  CHECK(b.Equals(a));
  CHECK(a.Equals(a));
}

TEST_CASE("SecretBytes: Equals is false when any single byte differs") {
  const std::string base(32, '\x5a');
  SecretBytes a = SecretBytes::CopyOf(std::string_view(base));
  for (size_t i = 0; i < base.size(); ++i) {
    std::string other = base;
    other[i] ^= 0x01;
    CAPTURE(i);
    CHECK_FALSE(a.Equals(SecretBytes::CopyOf(std::string_view(other))));
  }
}

TEST_CASE("SecretBytes: Equals is false when sizes differ, even for a prefix") {
  SecretBytes a = SecretBytes::CopyOf(std::string_view("abcdef"));
  SecretBytes prefix = SecretBytes::CopyOf(std::string_view("abcde"));
  CHECK_FALSE(a.Equals(prefix));
  CHECK_FALSE(prefix.Equals(a));
  CHECK_FALSE(a.Equals(SecretBytes()));
  CHECK_FALSE(SecretBytes().Equals(a));
}

TEST_CASE("SecretBytes: two empty secrets are equal") {
  CHECK(SecretBytes().Equals(SecretBytes()));
  CHECK(SecretBytes(0).Equals(SecretBytes::CopyOf(std::string_view())));
}

TEST_CASE("SecretBytes: a zero-filled secret differs from one holding data of the same size") {
  SecretBytes zeros(4);
  SecretBytes data = SecretBytes::CopyOf(std::string_view("\x00\x00\x00\x01", 4));
  CHECK_FALSE(zeros.Equals(data));
}

TEST_CASE("Wipe: zeroes the bytes it is given and nothing else") {
  char buffer[8] = {'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h'};
  Wipe(buffer + 2, 4);
  CHECK(std::string(buffer, 8) == std::string("ab\0\0\0\0gh", 8));
}

TEST_CASE("Wipe: accepts a null pointer and a zero size") {
  Wipe(nullptr, 16);
  char c = 'x';
  Wipe(&c, 0);
  CHECK(c == 'x');
}

TEST_CASE("Random: NewSecret returns the injected bytes and successive secrets differ") {
  testing::FakeRandom random("seed");
  testing::FakeRandom same("seed");
  SecretBytes first = random.NewSecret(32);
  SecretBytes second = random.NewSecret(32);
  REQUIRE(first.size() == 32);
  CHECK_FALSE(first.Equals(second));
  CHECK(first.Equals(same.NewSecret(32)));
}

TEST_CASE("Random: the system generator gives distinct secrets") {
  SecretBytes a = SystemRandom().NewSecret(32);
  SecretBytes b = SystemRandom().NewSecret(32);
  CHECK_FALSE(a.Equals(b));
  CHECK_FALSE(a.Equals(SecretBytes(32)));
}

}  // namespace
}  // namespace kmsplugin::crypto

namespace kmsplugin::crypto {
namespace {

TEST_CASE("SecretBytes: a small secret's arena slot is wiped before it is handed out again") {
  const uint8_t* first_address = nullptr;
  {
    SecretBytes secret(32);
    std::memset(secret.data(), 0xA5, secret.size());
    first_address = secret.data();
  }
  // The arena's free list is LIFO: the next small secret takes the slot just released.
  SecretBytes again(SecretBytes::kArenaSlotSize);
  REQUIRE(again.data() == first_address);
  for (size_t i = 0; i < again.size(); ++i) {
    INFO("byte " << i);
    REQUIRE(again.data()[i] == 0);
  }
}

TEST_CASE("SecretBytes: more small secrets than the arena holds still get locked memory of their own") {
  std::vector<SecretBytes> secrets;
  for (int i = 0; i < 1500; ++i) {
    secrets.emplace_back(32);
    secrets.back().data()[0] = static_cast<uint8_t>(i);
  }
  for (int i = 0; i < 1500; ++i) {
    INFO("secret " << i);
    CHECK(secrets[i].data()[0] == static_cast<uint8_t>(i));
  }
  secrets.clear();
  SecretBytes after(16);
  CHECK(after.data()[0] == 0);
}

TEST_CASE("SecretBytes: a secret larger than an arena slot round-trips and moves") {
  const std::string big(SecretBytes::kArenaSlotSize + 1, 'b');
  SecretBytes secret = SecretBytes::CopyOf(big);
  SecretBytes moved = std::move(secret);
  CHECK(moved.view() == big);
  CHECK(secret.empty());
}

}  // namespace
}  // namespace kmsplugin::crypto
