"""The one stable 64-bit string hash: FNV-1a 64 over UTF-8 bytes, as signed int64.

    h = 0xcbf29ce484222325
    for each byte b of s.encode("utf-8"):
        h = ((h ^ b) * 0x100000001b3) mod 2**64
    id = h reinterpreted as a two's-complement int64

String id columns are hashed with it before bucketing (`id -> id mod rows`,
inside the model). deploy/cpp/rocketrec_hash.h implements the same function;
both sides are tested against TEST_VECTORS.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1

# (string, signed int64 id): shared with deploy/cpp tests.
TEST_VECTORS: tuple[tuple[str, int], ...] = (
    ("", -3750763034362895579),  # 0xcbf29ce484222325, the offset basis
    ("a", -5808556873153909620),  # 0xaf63dc4c8601ec8c (published FNV-1a 64 vector)
    ("foobar", -8821353812377114648),  # 0x85944171f73967e8 (published FNV-1a 64 vector)
    ("68fd1e64", 1938573664431018461),
    ("user:42", 7788164824035369410),
    ("héllo wörld", 1261653000850579490),
)


def fnv1a64(s: str) -> int:
    """Reference (slow, scalar) implementation; returns a signed int64 as a Python int."""
    h = FNV_OFFSET
    for b in s.encode("utf-8"):
        h = ((h ^ b) * FNV_PRIME) & _MASK
    return h - (1 << 64) if h >= 1 << 63 else h


def _hash_plain_strings(arr: pa.Array) -> np.ndarray:
    """Vectorised FNV-1a over a non-null string array: one numpy pass per byte position."""
    arr = arr.cast(pa.large_string()) if not pa.types.is_large_string(arr.type) else arr
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.empty(0, np.uint8)
    starts = offsets[:-1]
    lens = offsets[1:] - starts
    # Longest strings first, so the strings still "active" at byte j are a prefix.
    order = np.argsort(-lens, kind="stable")
    s_starts = starts[order]
    s_lens = lens[order]
    h = np.full(n, FNV_OFFSET, dtype=np.uint64)
    prime = np.uint64(FNV_PRIME)
    maxlen = int(s_lens[0]) if n else 0
    # number of strings longer than j, for each j
    active_counts = np.searchsorted(-s_lens, -np.arange(maxlen), side="left")
    for j in range(maxlen):
        k = int(active_counts[j])
        b = data[s_starts[:k] + j].astype(np.uint64)
        h[:k] = (h[:k] ^ b) * prime  # uint64 arithmetic wraps mod 2**64
    out = np.empty(n, dtype=np.uint64)
    out[order] = h
    return out.view(np.int64)


def hash_strings(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Hash a string array (no nulls) to int64 ids; hashes each distinct value once."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        enc = arr
    else:
        if len(arr) == 0:
            return np.empty(0, dtype=np.int64)
        enc = pc.dictionary_encode(arr)
    uniq = _hash_plain_strings(enc.dictionary)
    idx = enc.indices.to_numpy(zero_copy_only=False)
    return uniq[idx]


# -- crosses ------------------------------------------------------------------------
#
# The id of a cross of k features is a hash of one raw id from each input, in the
# order the spec lists the inputs (string ids hashed with fnv1a64 first, bucketized
# numbers as their bucket id):
#
#     h = 0xcbf29ce484222325
#     for x in (x_1, ..., x_k): h = ((h ^ x) * 0x100000001b3) mod 2**64   # x as uint64
#     h = fmix64(h)        # MurmurHash3's 64-bit finalizer, spreads the bits for `mod rows`
#     id = h reinterpreted as a two's-complement int64
#
#     fmix64(h): h ^= h >> 33; h *= 0xff51afd7ed558ccd; h ^= h >> 33;
#                h *= 0xc4ceb9fe1a85ec53; h ^= h >> 33          (all mod 2**64)

FMIX_C1 = 0xFF51AFD7ED558CCD
FMIX_C2 = 0xC4CEB9FE1A85EC53


def _signed(h: int) -> int:
    return h - (1 << 64) if h >= 1 << 63 else h


def fmix64(h: int) -> int:
    h &= _MASK
    h ^= h >> 33
    h = (h * FMIX_C1) & _MASK
    h ^= h >> 33
    h = (h * FMIX_C2) & _MASK
    h ^= h >> 33
    return h


def cross_hash(ids: list[int] | tuple[int, ...]) -> int:
    """Reference (scalar) cross id of one id per input; returns a signed int64."""
    h = FNV_OFFSET
    for x in ids:
        h = ((h ^ (int(x) & _MASK)) * FNV_PRIME) & _MASK
    return _signed(fmix64(h))


# (input ids, signed int64 cross id): shared with deploy/cpp tests and the manifest.
CROSS_TEST_VECTORS: tuple[tuple[tuple[int, ...], int], ...] = (
    ((0, 0), -2665635029621057939),
    ((1, 2), 6852168892901551024),
    ((2, 1), 9130320004850793785),
    ((-1, 7, 3), -231551995900140335),
    ((-(1 << 63), (1 << 63) - 1), 7610287951619186576),
    ((7788164824035369410, 17), 4991271251241501370),  # fnv1a64("user:42") x 17
    ((1261653000850579490, -8821353812377114648, 0), 7833496275983497836),
)
