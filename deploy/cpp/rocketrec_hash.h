// The stable 64-bit hashes of rocketrec (same as rocketrec/spec/hashing.py).
//   fnv1a64:    string ids: FNV-1a 64 over the UTF-8 bytes, as two's-complement int64.
//   cross_hash: crossed features (computed inside the exported model; here for tests,
//               debugging and servers that precompute): FNV-1a over the 64-bit ids,
//               then MurmurHash3's fmix64.
#pragma once
#include <cstddef>
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

inline uint64_t fmix64(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ULL;
  h ^= h >> 33;
  return h;
}

// The id of one combination of a cross's inputs (one raw id per input, in spec order).
inline int64_t cross_hash(const int64_t* ids, size_t n) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (size_t i = 0; i < n; ++i) {
    h ^= static_cast<uint64_t>(ids[i]);
    h *= 0x100000001b3ULL;
  }
  return static_cast<int64_t>(fmix64(h));
}

}  // namespace rocketrec
