// The one stable 64-bit string hash of rocketrec (same as rocketrec/hashing.py):
// FNV-1a 64 over the UTF-8 bytes, result reinterpreted as two's-complement int64.
#pragma once
#include <cstdint>
#include <string>

namespace rocketrec {

inline int64_t fnv1a64(const std::string& utf8) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char b : utf8) {
    h ^= static_cast<uint64_t>(b);
    h *= 0x100000001b3ULL;  // wraps mod 2^64
  }
  return static_cast<int64_t>(h);
}

}  // namespace rocketrec
