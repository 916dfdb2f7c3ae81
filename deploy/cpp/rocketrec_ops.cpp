// rocketrec's fused serving operator: raw request inputs -> the light tower's input.
//
// One source, built twice: by CMake into librocketrec_ops.so (deploy/cpp, what C++
// servers link or dlopen) and by the Python package's install (setup.py, loaded by
// `rocketrec.serving.ops`). Registered with TORCH_LIBRARY in the namespace `rocketrec`:
//
//   rocketrec::light_features(values, lengths, dense, icfg, fcfg, tables, int8, out_dim)
//       -> x float32 [B, K]
//   rocketrec::light_features_context(values, lengths, dense, icfg, fcfg, tables, int8)
//       -> (context share [1, K], candidate shares [M, Kc], candidate columns int64 [Kc])
//   rocketrec::light_first_layer(values, lengths, dense, icfg, fcfg, tables, int8, wg_t,
//       wg_sum, b_eff, eps) -> h [B, H]: forward's LayerNorm and first Linear, folded
//       (FirstLayer below)
//   rocketrec::light_first_layer_context(values, lengths, dense, icfg, fcfg, tables, int8,
//       wg_t, wg_sum, b_eff, eps) -> h [M, H]: score_candidates' first layer (see below)
//   rocketrec::preprocess(values, lengths, dense, icfg, fcfg, context)
//       -> (rows int64 [N'], lengths int64 [L*B], dense float32 [B, D])
//   rocketrec::version() -> int
//   rocketrec::fold_budget_mb(mb) -> the previous budget (MiB) of the first layer folded
//       into single-id tables (FoldSet below; mb < 0 reads it)
//   rocketrec::fold_stats() -> [models, lookups, bytes] folded in this process
//   rocketrec::fold_clear() -> sets dropped (weights changed behind the version counter)
//   rocketrec::lean_candidates(on) -> whether score_candidates' lean path was on (on < 0
//       reads it; candidates_lean below)
//   rocketrec::lean_calls() -> score_candidates calls the lean path scored in this process
//
// Inputs are the serving contract's: values int64 [N] raw ids (strings hashed with FNV-1a
// 64 first), lengths int64 [I*B] input-major, dense float32 [B, C] raw numbers (NaN =
// missing). The semantics are rocketrec.model.preprocess.Preprocess's (the reference,
// plain torch, which training runs): max_ids truncation, bucketizing (id 0 = NaN, else
// 1 + the number of boundaries <= x in float32), crosses (every combination of one id from
// each input's bag, first input outermost, FNV-1a over the 64-bit ids then fmix64, then
// max_ids), row = id mod rows (non-negative) + the fused table's row offset, sum or mean
// pooling, dense fill and transforms. `preprocess` returns what Preprocess returns
// (a parity test compares them bit for bit); `light_features` pools the rows straight from
// the fused tables into the tower input, in the training model's column order.
//
// icfg (int64) and fcfg (float32) describe the model; rocketrec.serving.ops.pack_config
// writes them (layout below, version-checked). Context mode (row 0 = one context, rows
// 1..M candidates): an input is the context's when row 0 gives it (a non-empty bag, a
// non-NaN number), else the candidates'; crosses are computed per candidate from the merged
// inputs. The context's share and the candidates' shares of the tower input have disjoint
// columns, and their sum is the merged rows' input.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>  // AtenTensorHandle, AOTITorchError (C shims)

#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <strings.h>  // strcasecmp
#include <sys/mman.h>  // madvise

#include "rocketrec_hash.h"
#include "reused_tensor.h"

namespace rocketrec_ops {

constexpr int64_t kOpsVersion = 2;    // bump on any change of semantics or signatures
constexpr int64_t kConfigFormat = 1;  // icfg/fcfg layout

constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ULL;  // rocketrec_hash.h's constants
constexpr uint64_t kFnvPrime = 0x100000001b3ULL;
using rocketrec::fmix64;  // the cross hash's finalizer, shared with the predictor

// The model description, parsed from icfg / fcfg (a few dozen numbers, parsed per call).
struct Lookup {
  int64_t out, rows, offset, group, mean, col, dim;

  uint64_t inv = 0;  // floor((2^64 - 1) / rows): set by parse_config

  // id mod rows, non-negative (Python's %), without a divide: a 64-bit idiv (about 10
  // cycles a lookup) was half the time of computing the rows. A negative id maps through
  // ~id = -id - 1 >= 0: id mod d = d - 1 - (~id mod d).
  int64_t row_of(int64_t id) const {
    const uint64_t neg = static_cast<uint64_t>(id >> 63);  // all ones if id < 0
    const uint64_t t = static_cast<uint64_t>(id) ^ neg;     // id, or -id - 1 = ~id
    const uint64_t d = static_cast<uint64_t>(rows);
    const uint64_t q = static_cast<uint64_t>((static_cast<unsigned __int128>(t) * inv) >> 64);
    uint64_t r = t - q * d;  // q is floor(t / d) or one less: r < 2d
    r = r >= d ? r - d : r;
    return static_cast<int64_t>(neg ? d - 1 - r : r);
  }
};
// ids[0..n) -> out[j] = ids[j] mod k.rows + k.offset (below: vectorized where it can be)
void rows_of_run(const Lookup& k, const int64_t* ids, int64_t n, int64_t* out);
// v[i] = log1p(v[i]) for v[i] >= 0 or NaN (below: vectorized where it can be)
void log1p_nonneg(float* v, int64_t n);

struct Config {
  int64_t I, Kb, D, F, L, G, K, NC;
  std::vector<int64_t> id_cap;        // [I], 0 = none
  std::vector<int64_t> bound_start;   // [Kb + 1] into boundaries
  std::vector<int64_t> out_kind;      // [F] 0 id input, 1 cross, 2 bucket
  std::vector<int64_t> out_index;     // [F]
  std::vector<int64_t> cross_cap;     // [NC]
  std::vector<int64_t> cross_start;   // [NC + 1] into cross_src
  std::vector<int64_t> cross_src;     // source s: < I id input s, else bucket s - I
  std::vector<Lookup> lookups;        // [L]
  std::vector<int64_t> group_dim;     // [G]
  const float* bounds = nullptr;
  const float* dense_p = nullptr;     // [D, 6]: fill, log1p, lo, hi, scale, shift
  bool tiles = false;                 // every column written once by a lookup or dense
};

Config parse_config(const at::Tensor& icfg, const at::Tensor& fcfg) {
  TORCH_CHECK(icfg.dim() == 1 && icfg.scalar_type() == at::kLong && icfg.is_contiguous(),
              "rocketrec: icfg must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(fcfg.dim() == 1 && fcfg.scalar_type() == at::kFloat && fcfg.is_contiguous(),
              "rocketrec: fcfg must be a contiguous 1-D float32 tensor");
  const int64_t* p = icfg.data_ptr<int64_t>();
  const int64_t n = icfg.numel();
  int64_t at = 0;
  auto next = [&]() -> int64_t {
    TORCH_CHECK(at < n, "rocketrec: icfg is truncated (", n, " entries)");
    return p[at++];
  };
  TORCH_CHECK(n > 0 && p[0] == kConfigFormat, "rocketrec: icfg format ", n > 0 ? p[0] : -1,
              " is not ", kConfigFormat, ": model exported for another version of the op library");
  ++at;
  Config c;
  c.I = next(); c.Kb = next(); c.D = next(); c.F = next(); c.L = next(); c.G = next();
  c.K = next(); c.NC = next();
  TORCH_CHECK(c.I >= 0 && c.Kb >= 0 && c.D >= 0 && c.F >= 0 && c.L >= 0 && c.G >= 0 && c.K >= 0 &&
                  c.NC >= 0, "rocketrec: icfg has negative sizes");
  for (int64_t i = 0; i < c.I; ++i) c.id_cap.push_back(next());
  for (int64_t k = 0; k <= c.Kb; ++k) c.bound_start.push_back(next());
  for (int64_t f = 0; f < c.F; ++f) {
    c.out_kind.push_back(next());
    c.out_index.push_back(next());
  }
  for (int64_t x = 0; x < c.NC; ++x) c.cross_cap.push_back(next());
  for (int64_t x = 0; x <= c.NC; ++x) c.cross_start.push_back(next());
  const int64_t nsrc = c.NC > 0 ? c.cross_start.back() : 0;
  for (int64_t s = 0; s < nsrc; ++s) c.cross_src.push_back(next());
  for (int64_t l = 0; l < c.L; ++l) {
    Lookup k{};
    k.out = next(); k.rows = next(); k.offset = next(); k.group = next();
    k.mean = next(); k.col = next(); k.dim = next();
    TORCH_CHECK(k.out >= 0 && k.out < c.F && k.rows > 0 && k.group >= 0 && k.group < c.G &&
                    k.col >= 0 && k.dim >= 0 && k.col + k.dim <= c.K,
                "rocketrec: icfg lookup ", l, " is out of range");
    k.inv = ~uint64_t{0} / static_cast<uint64_t>(k.rows);
    c.lookups.push_back(k);
  }
  for (int64_t g = 0; g < c.G; ++g) c.group_dim.push_back(next());
  TORCH_CHECK(at == n, "rocketrec: icfg has ", n - at, " trailing entries");
  TORCH_CHECK(c.D <= c.K, "rocketrec: icfg has ", c.D, " dense columns in a row of ", c.K);
  {  // the lookups' columns and the D dense ones cover [0, K) once: x needs no zero fill
    std::vector<int> cover(static_cast<size_t>(c.K), 0);
    for (const Lookup& k : c.lookups)
      for (int64_t j = k.col; j < k.col + k.dim; ++j) ++cover[static_cast<size_t>(j)];
    c.tiles = c.D <= c.K;
    for (int64_t j = 0; c.tiles && j < c.K - c.D; ++j) c.tiles = cover[static_cast<size_t>(j)] == 1;
    for (int64_t j = c.K - c.D; c.tiles && j < c.K; ++j) c.tiles = cover[static_cast<size_t>(j)] == 0;
  }
  for (int64_t f = 0; f < c.F; ++f) {
    const int64_t lim = c.out_kind[f] == 0 ? c.I : c.out_kind[f] == 1 ? c.NC : c.Kb;
    TORCH_CHECK(c.out_index[f] >= 0 && c.out_index[f] < lim, "rocketrec: icfg output ", f,
                " is out of range");
  }
  for (int64_t s : c.cross_src)
    TORCH_CHECK(s >= 0 && s < c.I + c.Kb, "rocketrec: icfg cross source out of range");
  const int64_t nb = c.Kb > 0 ? c.bound_start.back() : 0;
  TORCH_CHECK(fcfg.numel() == nb + 6 * c.D, "rocketrec: fcfg has ", fcfg.numel(),
              " entries, expected ", nb + 6 * c.D);
  c.bounds = fcfg.data_ptr<float>();
  c.dense_p = c.bounds + nb;
  return c;
}

// Parsing allocates a dozen small vectors: done once per distinct icfg per thread (the
// exported module's icfg is a constant), keyed by its content; fcfg's pointers are per call.
const Config& cached_config(const at::Tensor& icfg, const at::Tensor& fcfg) {
  thread_local std::vector<std::pair<std::vector<int64_t>, std::unique_ptr<Config>>> cache;
  TORCH_CHECK(icfg.dim() == 1 && icfg.scalar_type() == at::kLong && icfg.is_contiguous(),
              "rocketrec: icfg must be a contiguous 1-D int64 tensor");
  const int64_t* p = icfg.data_ptr<int64_t>();
  const size_t n = static_cast<size_t>(icfg.numel());
  Config* hit = nullptr;
  for (auto& e : cache)
    if (e.first.size() == n && std::equal(e.first.begin(), e.first.end(), p)) hit = e.second.get();
  if (hit == nullptr) {
    auto c = std::make_unique<Config>(parse_config(icfg, fcfg));
    if (cache.size() >= 8) cache.erase(cache.begin());
    cache.emplace_back(std::vector<int64_t>(p, p + n), std::move(c));
    hit = cache.back().second.get();
  }
  // fcfg is checked and re-pointed on every call (its storage may differ)
  const int64_t nb = hit->Kb > 0 ? hit->bound_start.back() : 0;
  TORCH_CHECK(fcfg.dim() == 1 && fcfg.scalar_type() == at::kFloat && fcfg.is_contiguous() &&
                  fcfg.numel() == nb + 6 * hit->D,
              "rocketrec: fcfg must be a contiguous float32 tensor of ", nb + 6 * hit->D, " entries");
  hit->bounds = fcfg.data_ptr<float>();
  hit->dense_p = hit->bounds + nb;
  return *hit;
}

// The serving contract's input checks (the same messages as the portable module's).
extern const bool kHasAvx512;
uint64_t lengths_scan_avx512(const int64_t* l, int64_t n, uint64_t nv, uint64_t& sum);

// An entry point's values, lengths and dense, contiguous: borrowed when they are already
// (the usual case: no new tensor handles, no reference counts), else contiguous copies
struct Contiguous {
  c10::MaybeOwned<at::Tensor> vo, lo, dop;
  Contiguous(const at::Tensor& values, const at::Tensor& lengths, const at::Tensor& dense)
      : vo(values.expect_contiguous()), lo(lengths.expect_contiguous()), dop(dense.expect_contiguous()) {}
  const at::Tensor& v() const { return *vo; }
  const at::Tensor& l() const { return *lo; }
  const at::Tensor& d() const { return *dop; }
};

int64_t check_inputs(const Config& c, const at::Tensor& values, const at::Tensor& lengths,
                     const at::Tensor& dense) {
  const int64_t C = c.D + c.Kb;
  TORCH_CHECK(dense.dim() == 2 && dense.size(1) == C && dense.scalar_type() == at::kFloat,
              "rocketrec: dense must be float32 [B, ", C, "], got shape ", dense.sizes(), " ",
              dense.scalar_type());
  TORCH_CHECK(values.dim() == 1 && lengths.dim() == 1 && values.scalar_type() == at::kLong &&
                  lengths.scalar_type() == at::kLong,
              "rocketrec: values and lengths must be 1-D int64 tensors");
  const int64_t B = dense.size(0);
  TORCH_CHECK(lengths.numel() == c.I * B, "rocketrec: lengths must have I*B = ", c.I, "*", B,
              " entries (input-major), got ", lengths.numel());
  const auto lc_ = lengths.expect_contiguous();
  const at::Tensor& lc = *lc_;
  const int64_t* l = lc.data_ptr<int64_t>();
  // one pass, no branch per entry: a negative length (huge as unsigned) or one past
  // values.numel() sets `bad`. When n lengths of at most nv each cannot sum past 2^64, the
  // sum is checked once at the end (a loop the compiler vectorizes); else a running check
  // catches the sum before it can wrap.
  const uint64_t nv = static_cast<uint64_t>(values.numel());
  const int64_t n = lc.numel();
  uint64_t bad = 0, sum = 0, cap = 0;
  if (!__builtin_mul_overflow(nv, static_cast<uint64_t>(n), &cap)) {
    if (kHasAvx512) {
      bad = lengths_scan_avx512(l, n, nv, sum);
    } else {
      for (int64_t i = 0; i < n; ++i) {
        bad |= static_cast<uint64_t>(static_cast<uint64_t>(l[i]) > nv);
        sum += static_cast<uint64_t>(l[i]);
      }
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      bad |= static_cast<uint64_t>(static_cast<uint64_t>(l[i]) > nv);
      sum += static_cast<uint64_t>(l[i]);
      bad |= static_cast<uint64_t>(sum > nv);
    }
  }
  for (int64_t i = 0; bad && i < lc.numel(); ++i) TORCH_CHECK(l[i] >= 0, "rocketrec: lengths must be non-negative");
  TORCH_CHECK(!bad && sum <= nv, "rocketrec: lengths sum to more than the ", values.numel(),
              " entries of values");
  const int64_t total = static_cast<int64_t>(sum);
  TORCH_CHECK(lc.numel() > 0 || values.numel() == 0, "rocketrec: values given but no lengths");
  TORCH_CHECK(total == values.numel(), "rocketrec: lengths sum to ", total, " but values has ",
              values.numel(), " entries");
  return B;
}

// A call's scratch vectors, kept per thread (one call at a time per thread): at batch 1
// their allocations were a visible share of a call.
struct WorkBuffers {
  std::vector<int64_t> in_start, in_len, bucket;
  std::vector<uint8_t> ctx_gives, truncated;
  std::vector<uint64_t> scratch, next;
  std::vector<const uint8_t*> base;
  std::vector<int64_t> stride, nrows, rows, bag_end;
};

WorkBuffers& work_buffers() {
  thread_local WorkBuffers b;
  return b;
}

// Bucket input k of rows b0..b0+n-1 (dense x [B, D + Kb]) -> out[0..n): 0 for NaN, else 1 +
// the number of boundaries <= the value (float32)
// buckets' count on AVX-512, 16 rows at a time: out[b] = 1 + #{j : lo[j] <= col[b * C]},
// 0 for NaN (the scalar loop's compares, as masks)
__attribute__((target("avx512f"))) void buckets_avx512(const float* lo, int64_t nb, const float* col, int64_t C,
                                                       int64_t n, int64_t* out) {
  const __m512i one = _mm512_set1_epi32(1), step = _mm512_mullo_epi32(
                                                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                _mm512_set1_epi32(static_cast<int>(C)));
  for (int64_t b = 0; b < n; b += 16) {
    const __mmask16 m = n - b >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - b)) - 1u);
    const __m512 val = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, step, col + b * C, 4);
    __m512i cnt = one;
    for (int64_t j = 0; j < nb; ++j)
      cnt = _mm512_mask_add_epi32(cnt, _mm512_cmp_ps_mask(_mm512_set1_ps(lo[j]), val, _CMP_LE_OQ), cnt, one);
    cnt = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(val, val, _CMP_ORD_Q), cnt);  // NaN -> 0
    _mm512_mask_storeu_epi64(out + b, static_cast<__mmask8>(m), _mm512_cvtepi32_epi64(_mm512_castsi512_si256(cnt)));
    _mm512_mask_storeu_epi64(out + b + 8, static_cast<__mmask8>(m >> 8),
                             _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(cnt, 1)));
  }
}

void buckets(const Config& c, int64_t k, const float* x, int64_t b0, int64_t n, int64_t* out) {
  const int64_t C = c.D + c.Kb;
  const float* lo = c.bounds + c.bound_start[static_cast<size_t>(k)];
  const float* hi = c.bounds + c.bound_start[static_cast<size_t>(k + 1)];
  const float* col = x + b0 * C + c.D + k;
  // the gather's int32 offsets: (16 rows) x C floats must fit
  if (kHasAvx512 && n >= 8 && hi - lo <= 32 && C < (int64_t{1} << 26)) return buckets_avx512(lo, hi - lo, col, C, n, out);
  if (hi - lo <= 32) {  // few boundaries: count those <= val without a branch (a binary
                        // search mispredicted about twice a row on random prices)
    const int64_t nb = hi - lo;
    for (int64_t b = 0; b < n; ++b) {
      const float val = col[b * C];
      int64_t m = 1;
      for (int64_t j = 0; j < nb; ++j) m += lo[j] <= val;
      out[b] = std::isnan(val) ? 0 : m;
    }
  } else {
    for (int64_t b = 0; b < n; ++b) {
      const float val = col[b * C];
      out[b] = std::isnan(val) ? 0 : 1 + static_cast<int64_t>(std::upper_bound(lo, hi, val) - lo);
    }
  }
}

struct Work {
  const Config& c;
  int64_t B;
  bool context;
  WorkBuffers& buf;
  // id inputs after max_ids: per input i and row b, [start, start + len) in values
  std::vector<int64_t>& in_start;  // [I * B]
  std::vector<int64_t>& in_len;
  const int64_t* v = nullptr;
  std::vector<int64_t>& bucket;     // [Kb * B] bucket ids
  std::vector<uint8_t>& ctx_gives;  // [I + Kb]: context mode, row 0 gives source s
  std::vector<uint64_t>& scratch;   // cross combinations of one row
  std::vector<uint64_t>& next;

  Work(const Config& cfg, int64_t b, bool ctx)
      : c(cfg), B(b), context(ctx), buf(work_buffers()), in_start(buf.in_start), in_len(buf.in_len),
        bucket(buf.bucket), ctx_gives(buf.ctx_gives), scratch(buf.scratch), next(buf.next) {}

  void sources(const at::Tensor& values, const at::Tensor& lengths, const at::Tensor& dense) {
    v = values.data_ptr<int64_t>();
    const int64_t* l = lengths.data_ptr<int64_t>();
    in_start.resize(static_cast<size_t>(c.I * B));
    in_len.resize(static_cast<size_t>(c.I * B));
    buf.truncated.assign(static_cast<size_t>(c.I), 0);
    int64_t pos = 0;
    int64_t* st = in_start.data();
    int64_t* ln = in_len.data();
    const int64_t nB = B;  // a local: the stores below could alias the member
    for (int64_t i = 0; i < c.I; ++i) {  // raw pointers: one input's rows in a tight loop
      const int64_t cap = c.id_cap[static_cast<size_t>(i)];
      const int64_t* li = l + i * nB;
      int64_t* si = st + i * nB;
      int64_t* ni = ln + i * nB;
      int64_t cut = 0;
      if (cap > 0) {
        for (int64_t b = 0; b < nB; ++b) {
          si[b] = pos;
          pos += li[b];
        }
        for (int64_t b = 0; b < nB; ++b) {
          cut |= li[b] > cap;
          ni[b] = std::min(li[b], cap);
        }
      } else {
        for (int64_t b = 0; b < nB; ++b) {
          si[b] = pos;
          pos += li[b];
        }
        std::copy(li, li + nB, ni);
      }
      buf.truncated[static_cast<size_t>(i)] = cut != 0;
    }
    const float* x = dense.data_ptr<float>();
    bucket.resize(static_cast<size_t>(c.Kb * B));
    for (int64_t k = 0; k < c.Kb; ++k) buckets(c, k, x, 0, B, bucket.data() + k * B);
    if (context) {
      ctx_gives.assign(static_cast<size_t>(c.I + c.Kb), 0);
      for (int64_t i = 0; i < c.I; ++i) ctx_gives[static_cast<size_t>(i)] = in_len[static_cast<size_t>(i * B)] > 0;
      for (int64_t k = 0; k < c.Kb; ++k)
        ctx_gives[static_cast<size_t>(c.I + k)] = !std::isnan(x[c.D + k]);
    }
  }

  // The ids of source s for row b (context mode: the merged candidate row b).
  void source_bag(int64_t s, int64_t b, const int64_t*& ptr, int64_t& n, int64_t& one) {
    int64_t r = b;
    if (context && ctx_gives[static_cast<size_t>(s)]) r = 0;
    if (s < c.I) {
      ptr = v + in_start[static_cast<size_t>(s * B + r)];
      n = in_len[static_cast<size_t>(s * B + r)];
    } else {
      one = bucket[static_cast<size_t>((s - c.I) * B + r)];
      ptr = &one;
      n = 1;
    }
  }

  // Lookup l's keys when every row has exactly one: a bucket's index, or a cross's hash when
  // each of its sources gives one id in every row. keys[b] then goes through `mod rows`
  // like an id; false (keys untouched past what was written) when some row has more or
  // fewer, which the general loop handles. Context mode: the candidates' rows 1..B-1 (row 0,
  // the context, has none: a cross is the merged rows', a bucket here not the context's), a
  // source the context gives taken from row 0 in every row.
  bool one_key_per_row(int64_t l, int64_t* keys) const {
    const Lookup& k = c.lookups[static_cast<size_t>(l)];
    const int64_t kind = c.out_kind[static_cast<size_t>(k.out)];
    const int64_t idx = c.out_index[static_cast<size_t>(k.out)];
    const int64_t nB = B, b0 = context ? 1 : 0, nk = nB - b0;
    auto given = [&](int64_t s) { return context && ctx_gives[static_cast<size_t>(s)] != 0; };
    if (kind == 2) {
      if (given(c.I + idx)) return false;
      std::copy(bucket.data() + idx * nB + b0, bucket.data() + idx * nB + nB, keys);
      return true;
    }
    if (kind != 1) return false;
    const int64_t s0 = c.cross_start[static_cast<size_t>(idx)];
    const int64_t s1 = c.cross_start[static_cast<size_t>(idx + 1)];
    if (s1 <= s0) return false;
    std::fill(keys, keys + nk, static_cast<int64_t>(kFnvOffset));
    for (int64_t q = s0; q < s1; ++q) {  // source by source: h = (h ^ id) * prime
      const int64_t src = c.cross_src[static_cast<size_t>(q)];
      if (given(src)) {  // the context's id (or bucket) in every candidate's cross
        uint64_t id;
        if (src < c.I) {
          if (in_len[static_cast<size_t>(src * nB)] != 1) return false;
          id = static_cast<uint64_t>(v[in_start[static_cast<size_t>(src * nB)]]);
        } else {
          id = static_cast<uint64_t>(bucket[static_cast<size_t>((src - c.I) * nB)]);
        }
        for (int64_t b = 0; b < nk; ++b) keys[b] = static_cast<int64_t>((static_cast<uint64_t>(keys[b]) ^ id) * kFnvPrime);
      } else if (src < c.I) {
        const int64_t* len = in_len.data() + src * nB + b0;
        const int64_t* st = in_start.data() + src * nB + b0;
        int64_t ok = 1;
        for (int64_t b = 0; b < nk; ++b) ok &= len[b] == 1;
        if (!ok) return false;
        for (int64_t b = 0; b < nk; ++b)
          keys[b] = static_cast<int64_t>((static_cast<uint64_t>(keys[b]) ^ static_cast<uint64_t>(v[st[b]])) * kFnvPrime);
      } else {
        const int64_t* bk = bucket.data() + (src - c.I) * nB + b0;
        for (int64_t b = 0; b < nk; ++b)
          keys[b] = static_cast<int64_t>((static_cast<uint64_t>(keys[b]) ^ static_cast<uint64_t>(bk[b])) * kFnvPrime);
      }
    }
    for (int64_t b = 0; b < nk; ++b) keys[b] = static_cast<int64_t>(fmix64(static_cast<uint64_t>(keys[b])));
    return true;  // one hash per row: a cap (>= 1) never cuts it
  }

  // Cross x of row b -> scratch (hashed, capped).
  void cross(int64_t x, int64_t b) {
    const int64_t s0 = c.cross_start[static_cast<size_t>(x)];
    const int64_t s1 = c.cross_start[static_cast<size_t>(x + 1)];
    {  // the common case, one id from every source: one hash, no combinations
      uint64_t h = kFnvOffset;
      int64_t s = s0;
      for (; s < s1; ++s) {
        const int64_t* ptr;
        int64_t n, one;
        source_bag(c.cross_src[static_cast<size_t>(s)], b, ptr, n, one);
        if (n != 1) break;
        h = (h ^ static_cast<uint64_t>(ptr[0])) * kFnvPrime;
      }
      if (s == s1 && s1 > s0) {  // a cap is >= 1 or none: one hash is never cut
        scratch.assign(1, fmix64(h));
        return;
      }
    }
    scratch.assign(1, kFnvOffset);
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t* ptr;
      int64_t n, one;
      source_bag(c.cross_src[static_cast<size_t>(s)], b, ptr, n, one);
      next.clear();
      for (uint64_t h : scratch)  // earlier inputs outermost
        for (int64_t j = 0; j < n; ++j) next.push_back((h ^ static_cast<uint64_t>(ptr[j])) * kFnvPrime);
      scratch.swap(next);
      if (scratch.empty()) break;
    }
    for (auto& h : scratch) h = fmix64(h);
    const int64_t cap = c.cross_cap[static_cast<size_t>(x)];
    if (cap > 0 && static_cast<int64_t>(scratch.size()) > cap) scratch.resize(static_cast<size_t>(cap));
  }

  // Lookup l's ids in one run, when it reads an id input none of whose bags max_ids cut:
  // its ids are values[first, first + n) (input-major), in order. Returns n, or -1.
  int64_t plain_run(int64_t l, int64_t& first) const {
    const Lookup& k = c.lookups[static_cast<size_t>(l)];
    const int64_t idx = c.out_index[static_cast<size_t>(k.out)];
    if (B == 0 || c.out_kind[static_cast<size_t>(k.out)] != 0 || buf.truncated[static_cast<size_t>(idx)])
      return -1;
    const size_t last = static_cast<size_t>(idx * B + B - 1);
    first = in_start[static_cast<size_t>(idx * B)];
    return in_start[last] + in_len[last] - first;
  }

  template <class Emit, class Bag>
  void for_lookup(int64_t l, Emit&& emit, Bag&& bag) {
    {
      const Lookup& k = c.lookups[static_cast<size_t>(l)];
      const int64_t kind = c.out_kind[static_cast<size_t>(k.out)];
      const int64_t idx = c.out_index[static_cast<size_t>(k.out)];
      auto put = [&](int64_t b, int64_t id) { emit(l, b, k.row_of(id) + k.offset); };
      for (int64_t b = 0; b < B; ++b) {
        int64_t n = 0;
        if (kind == 0) {
          const int64_t* ptr = v + in_start[static_cast<size_t>(idx * B + b)];
          n = in_len[static_cast<size_t>(idx * B + b)];
          for (int64_t j = 0; j < n; ++j) put(b, ptr[j]);
        } else if (kind == 2) {
          const bool given = context && ctx_gives[static_cast<size_t>(c.I + idx)];
          if (!context || (b == 0) == given) {
            put(b, bucket[static_cast<size_t>(idx * B + b)]);
            n = 1;
          }
        } else if (!context || b > 0) {
          cross(idx, b);
          for (uint64_t h : scratch) put(b, static_cast<int64_t>(h));
          n = static_cast<int64_t>(scratch.size());
        }
        bag(l, b, n);
      }
    }
  }

  // Dense fill and transforms of rows b0 .. b0 + nb - 1 (default: every row; not the
  // context's split) into out + (b - b0) * ld, column by column: one column's parameters
  // held across the rows, its branches taken once, its log1p over the column at once.
  void dense_rows(const float* x, float* out, int64_t ld, int64_t b0 = 0, int64_t nb = -1) const {
    const int64_t C = c.D + c.Kb;
    if (nb < 0) nb = B - b0;
    thread_local std::vector<float> col;
    if (col.size() < static_cast<size_t>(nb)) col.resize(static_cast<size_t>(nb));
    float* cv = col.data();
    for (int64_t j = 0; j < c.D; ++j) {
      const float* q = c.dense_p + 6 * j;
      const float fill = q[0], lo = q[2], hi = q[3], scale = q[4], shift = q[5];
      const bool log = q[1] != 0.0f, affine = scale != 1.0f || shift != 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        float val = x[(b0 + b) * C + j];
        if (std::isnan(val)) val = fill;
        cv[b] = log ? std::max(val, 0.0f) : val;
      }
      if (log) log1p_nonneg(cv, nb);
      for (int64_t b = 0; b < nb; ++b) {
        float val = std::min(std::max(cv[b], lo), hi);
        if (affine) val = shift + val * scale;
        out[b * ld + j] = val;
      }
    }
  }

  // Dense fill and transforms of row b into out[0..D); context mode zeroes the other side.
  void dense_row(const float* x, int64_t b, float* out) const {
    dense_rows(x, out, c.D, b, 1);  // one transform code for every path
    if (!context) return;
    for (int64_t j = 0; j < c.D; ++j)
      if (std::isnan(x[j]) == (b == 0)) out[j] = 0.0f;  // the other side gives this column
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> preprocess(const at::Tensor& values,
                                                          const at::Tensor& lengths,
                                                          const at::Tensor& dense,
                                                          const at::Tensor& icfg,
                                                          const at::Tensor& fcfg, bool context) {
  const Config& c = cached_config(icfg, fcfg);
  const int64_t B = check_inputs(c, values, lengths, dense);
  TORCH_CHECK(!context || B >= 2, "rocketrec: score_candidates needs the context row and >= 1 candidate");
  const Contiguous in(values, lengths, dense);
  const at::Tensor &vc = in.v(), &lc = in.l(), &dc = in.d();
  Work w(c, B, context);
  w.sources(vc, lc, dc);
  std::vector<int64_t> rows;
  auto lens = at::empty({c.L * B}, at::kLong);
  int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t l = 0; l < c.L; ++l) {
    int64_t first = 0;
    const int64_t n = w.plain_run(l, first);
    if (n >= 0) {  // the same run loop as table_rows (the tests check its rows here)
      const size_t at = rows.size();
      rows.resize(at + static_cast<size_t>(n));
      rows_of_run(c.lookups[static_cast<size_t>(l)], w.v + first, n, rows.data() + at);
      const int64_t idx = c.out_index[static_cast<size_t>(c.lookups[static_cast<size_t>(l)].out)];
      std::copy(w.in_len.data() + idx * B, w.in_len.data() + idx * B + B, lp + l * B);
      continue;
    }
    w.for_lookup(
        l, [&](int64_t, int64_t, int64_t r) { rows.push_back(r); },
        [&](int64_t ll, int64_t b, int64_t n2) { lp[ll * B + b] = n2; });
  }
  auto out_rows = at::empty({static_cast<int64_t>(rows.size())}, at::kLong);
  if (!rows.empty()) std::memcpy(out_rows.data_ptr<int64_t>(), rows.data(), rows.size() * sizeof(int64_t));
  auto x = at::empty({B, c.D}, at::kFloat);
  float* xp = x.data_ptr<float>();
  if (context)
    for (int64_t b = 0; b < B; ++b) w.dense_row(dc.data_ptr<float>(), b, xp + b * c.D);
  else
    w.dense_rows(dc.data_ptr<float>(), xp, c.D);
  return {out_rows, lens, x};
}

// One bag: out[0..dim) = the sum of its rows (fp32, or int8 row-wise: scale * q + bias),
// times `scale` (1, or 1/length for mean pooling); rows[i + kAhead] is prefetched (rows
// are random in large tables), up to the lookup's last row (npf). `out` is written, not
// added to: an empty bag writes zeros. The portable loop; pool_bag_avx2 below keeps the
// sum in registers.
constexpr int64_t kAhead = 8;

// An int8 row: qdim bytes, then its float32 scale and bias.
inline void scale_bias(const uint8_t* row, int64_t qdim, float& sc, float& bi) {
  std::memcpy(&sc, row + qdim, 4);
  std::memcpy(&bi, row + qdim + 4, 4);
}

__attribute__((always_inline)) inline void pool_bag_any(float* out, int64_t dim, const int64_t* rows, int64_t n,
                                                        int64_t npf, const uint8_t* base, int64_t stride, bool int8,
                                                        int64_t qdim, float scale) {
  for (int64_t j = 0; j < dim; ++j) out[j] = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < npf) __builtin_prefetch(base + rows[i + kAhead] * stride);
    const uint8_t* row = base + rows[i] * stride;
    if (int8) {
      float sc, bi;
      scale_bias(row, qdim, sc, bi);
      for (int64_t j = 0; j < dim; ++j) out[j] += sc * static_cast<float>(row[j]) + bi;
    } else {
      const float* e = reinterpret_cast<const float*>(row);
      for (int64_t j = 0; j < dim; ++j) out[j] += e[j];
    }
  }
  if (scale != 1.0f)
    for (int64_t j = 0; j < dim; ++j) out[j] *= scale;
}

// AVX2 + FMA, dims a multiple of 8 up to 64: NV vectors of 8 in registers; an int8 row
// converts its 8-byte groups to float in-register (the compiler's own code converts byte by
// byte, which made int8 slower than fp32).
template <int NV>
__attribute__((target("avx2,fma"), always_inline)) inline void pool_bag_avx2(
    float* out, const int64_t* rows, int64_t n, int64_t npf, const uint8_t* base, int64_t stride, bool int8,
    int64_t qdim, float scale) {
  __m256 acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < npf) __builtin_prefetch(base + rows[i + kAhead] * stride);
    const uint8_t* row = base + rows[i] * stride;
    if (int8) {
      float sc, bi;
      scale_bias(row, qdim, sc, bi);
      const __m256 vs = _mm256_set1_ps(sc), vb = _mm256_set1_ps(bi);
      for (int v = 0; v < NV; ++v) {
        const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * v));  // 8 bytes
        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q8));
        acc[v] = _mm256_add_ps(acc[v], _mm256_fmadd_ps(vs, q, vb));
      }
    } else {
      const float* e = reinterpret_cast<const float*>(row);
      for (int v = 0; v < NV; ++v) acc[v] = _mm256_add_ps(acc[v], _mm256_loadu_ps(e + 8 * v));
    }
  }
  const __m256 vsc = _mm256_set1_ps(scale);
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + 8 * v, _mm256_mul_ps(acc[v], vsc));
}

// Whether every bag holds exactly one row (most lookups: one id per request), so the
// loops below know n = 1 and the scale 1 at compile time.
inline bool one_row_bags(int64_t nb, const int64_t* bag_end, int64_t start) {
  bool one = true;
  for (int64_t b = 0; b < nb; ++b) one &= bag_end[b] == start + b + 1;
  return one;
}

// The bags of one lookup with the row kernel KERNEL (an always-inline pool_bag_*<NV>),
// expanded inside each ISA's function (a template would not inline across target
// attributes), with int8 and one-row bags as constants: no per-row branch on them, and
// n = 1, scale 1 known for one-row bags.
#define ROCKETREC_POOL_LOOP(KERNEL, I8, ONE)                                                    \
  {                                                                                             \
    const int64_t last = nb > 0 ? bag_end[nb - 1] : start;                                      \
    int64_t s0 = start;                                                                         \
    for (int64_t b = 0; b < nb; ++b) {                                                          \
      const int64_t end = (ONE) ? s0 + 1 : bag_end[b];                                          \
      const int64_t n = end - s0;                                                               \
      const float scale = !(ONE) && mean && n > 1 ? 1.0f / static_cast<float>(n) : 1.0f;       \
      KERNEL(out + b * ld, rows + s0, n, last - s0, base, stride, I8, qdim, scale);             \
      s0 = end;                                                                                 \
    }                                                                                           \
  }
#define ROCKETREC_POOL_BAGS(KERNEL)                                 \
  do {                                                              \
    const bool one = one_row_bags(nb, bag_end, start);              \
    if (int8) {                                                     \
      if (one) ROCKETREC_POOL_LOOP(KERNEL, true, true)              \
      else ROCKETREC_POOL_LOOP(KERNEL, true, false)                 \
    } else {                                                        \
      if (one) ROCKETREC_POOL_LOOP(KERNEL, false, true)             \
      else ROCKETREC_POOL_LOOP(KERNEL, false, false)                \
    }                                                               \
  } while (0)

__attribute__((target("avx2,fma"))) void pool_lookup_avx2(float* out, int64_t ld, int64_t dim, bool mean,
                                                         int64_t nb, const int64_t* bag_end, int64_t start,
                                                         const int64_t* rows, const uint8_t* base,
                                                         int64_t stride, bool int8, int64_t qdim) {
  switch (dim) {
    case 8: ROCKETREC_POOL_BAGS(pool_bag_avx2<1>); break;
    case 16: ROCKETREC_POOL_BAGS(pool_bag_avx2<2>); break;
    case 24: ROCKETREC_POOL_BAGS(pool_bag_avx2<3>); break;
    case 32: ROCKETREC_POOL_BAGS(pool_bag_avx2<4>); break;
    case 64: ROCKETREC_POOL_BAGS(pool_bag_avx2<8>); break;
    default: {
      const int64_t last = nb > 0 ? bag_end[nb - 1] : start;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t n = bag_end[b] - start;
        const float scale = mean && n > 1 ? 1.0f / static_cast<float>(n) : 1.0f;
        pool_bag_any(out + b * ld, dim, rows + start, n, last - start, base, stride, int8, qdim, scale);
        start = bag_end[b];
      }
    }
  }
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12, inside vpmovzxbd's intrinsic
// AVX-512: dims 16, 32, 64 as NV vectors of 16 (an int8 row's 16-byte groups widened in
// one step); other dims go to the AVX2 loop
// One row of a bag added to a[NV] (int8: scale * q, its bias to bsum)
template <int NV>
__attribute__((target("avx512f,avx2,fma"), always_inline)) inline void pool_row_avx512(const uint8_t* row, bool int8,
                                                                                      int64_t qdim, __m512* a,
                                                                                      float& bsum) {
  if (int8) {
    float sc, bi;
    scale_bias(row, qdim, sc, bi);
    bsum += bi;
    const __m512 vs = _mm512_set1_ps(sc);
    for (int v = 0; v < NV; ++v) {
      const __m128i q8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * v));  // 16 bytes
      a[v] = _mm512_fmadd_ps(vs, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q8)), a[v]);
    }
  } else {
    const float* e = reinterpret_cast<const float*>(row);
    for (int v = 0; v < NV; ++v) a[v] = _mm512_add_ps(a[v], _mm512_loadu_ps(e + 16 * v));
  }
}

template <int NV>
__attribute__((target("avx512f,avx2,fma"), always_inline)) inline void pool_bag_avx512(
    float* out, const int64_t* rows, int64_t n, int64_t npf, const uint8_t* base, int64_t stride, bool int8,
    int64_t qdim, float scale) {
  // two chains of adds (even and odd rows), added at the end: one chain waited on the add's
  // latency at every row of a long bag (2-3% of the light tower at batch 256, fp32 and int8)
  __m512 acc[2][NV];
  for (int c = 0; c < 2; ++c)
    for (int v = 0; v < NV; ++v) acc[c][v] = _mm512_setzero_ps();
  // int8: the rows' biases, added once at the end, in two chains beside the two of rows
  // (one chain of scalar adds was twice as long as the rows' and set a 20-id bag's latency)
  float bsum[2] = {0.0f, 0.0f};
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    if (i + 1 + kAhead < npf) {
      __builtin_prefetch(base + rows[i + kAhead] * stride);
      __builtin_prefetch(base + rows[i + 1 + kAhead] * stride);
    } else if (i + kAhead < npf) {
      __builtin_prefetch(base + rows[i + kAhead] * stride);
    }
    pool_row_avx512<NV>(base + rows[i] * stride, int8, qdim, acc[0], bsum[0]);
    pool_row_avx512<NV>(base + rows[i + 1] * stride, int8, qdim, acc[1], bsum[1]);
  }
  if (i < n) pool_row_avx512<NV>(base + rows[i] * stride, int8, qdim, acc[0], bsum[0]);
  const __m512 vsc = _mm512_set1_ps(scale), vb = _mm512_set1_ps(bsum[0] + bsum[1]);
  for (int v = 0; v < NV; ++v) {
    __m512 t = _mm512_add_ps(acc[0][v], acc[1][v]);
    if (int8) t = _mm512_add_ps(t, vb);
    _mm512_storeu_ps(out + 16 * v, _mm512_mul_ps(t, vsc));
  }
}
#pragma GCC diagnostic pop

__attribute__((target("avx512f,avx2,fma"))) void pool_lookup_avx512(float* out, int64_t ld, int64_t dim, bool mean,
                                                                  int64_t nb, const int64_t* bag_end, int64_t start,
                                                                  const int64_t* rows, const uint8_t* base,
                                                                  int64_t stride, bool int8, int64_t qdim) {
  switch (dim) {
    case 16: ROCKETREC_POOL_BAGS(pool_bag_avx512<1>); break;
    case 32: ROCKETREC_POOL_BAGS(pool_bag_avx512<2>); break;
    default: ROCKETREC_POOL_BAGS(pool_bag_avx512<4>);  // 64
  }
}

// The instruction set the kernels use: the best this CPU has, at most ROCKETREC_OPS_ISA
// (portable | avx2 | avx512; ROCKETREC_OPS_PORTABLE=1 = portable): the tests run the
// parity checks on each level below this machine's.
int isa_level() {
  int level = 0;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    level = 1;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) level = 2;
  }
  const char* want = std::getenv("ROCKETREC_OPS_ISA");
  int cap = std::getenv("ROCKETREC_OPS_PORTABLE") != nullptr ? 0 : 2;
  if (want != nullptr && *want != '\0') {
    if (strcasecmp(want, "portable") == 0)
      cap = std::min(cap, 0);
    else if (strcasecmp(want, "avx2") == 0)
      cap = std::min(cap, 1);
    else if (strcasecmp(want, "avx512") != 0)  // a typo must not quietly test the best level
      std::fprintf(stderr, "rocketrec ops: ROCKETREC_OPS_ISA=%s is not portable, avx2 or avx512: "
                           "ignored\n", want);
  }
  return std::min(level, cap);
}
const int kIsa = isa_level();
const bool kHasAvx2 = kIsa >= 1;
const bool kHasAvx512 = kIsa >= 2;

// check_inputs' scan, 8 lengths at a time: 1 when one of l[0..n) is above nv as unsigned
// (a negative length is huge), with their sum (wrapping: only read when none is). The
// scalar loop was about 3% of a 200-candidate call.
__attribute__((target("avx512f"))) uint64_t lengths_scan_avx512(const int64_t* l, int64_t n, uint64_t nv,
                                                                uint64_t& sum) {
  __m512i mx = _mm512_setzero_si512(), acc = _mm512_setzero_si512();
  __m512i mx2 = _mm512_setzero_si512(), acc2 = _mm512_setzero_si512();  // two chains
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i x = _mm512_loadu_si512(l + i), y = _mm512_loadu_si512(l + i + 8);
    mx = _mm512_max_epu64(mx, x), mx2 = _mm512_max_epu64(mx2, y);
    acc = _mm512_add_epi64(acc, x), acc2 = _mm512_add_epi64(acc2, y);
  }
  mx = _mm512_max_epu64(mx, mx2), acc = _mm512_add_epi64(acc, acc2);
  for (; i + 8 <= n; i += 8) {
    const __m512i x = _mm512_loadu_si512(l + i);
    mx = _mm512_max_epu64(mx, x);
    acc = _mm512_add_epi64(acc, x);
  }
  if (i < n) {
    const __mmask8 m = static_cast<__mmask8>((1u << (n - i)) - 1);
    const __m512i x = _mm512_maskz_loadu_epi64(m, l + i);
    mx = _mm512_max_epu64(mx, x);
    acc = _mm512_add_epi64(acc, x);
  }
  sum = static_cast<uint64_t>(_mm512_reduce_add_epi64(acc));
  return static_cast<uint64_t>(_mm512_reduce_max_epu64(mx) > nv);
}

// A run of ids -> out[j] = ids[j] mod rows + offset (Python's %), for one lookup. On
// AVX-512 (DQ) with 2 <= rows < 2^40, 8 ids at a time in two floating-point rounds, exact
// by construction: q1 = floor(double(id) / rows) is within 3072 / rows + 1 of the true
// quotient (double's 53 bits against id's 64), so r1 = id - q1 * rows (64-bit integer
// arithmetic, exact even where q1 * rows wraps) has |r1| < 3072 + 2 * rows < 2^53 and
// converts exactly; the second floor is off by at most one (r2 in [0, rows] in fact, a
// review's bound; the code allows [-rows, 2 * rows)), and one step each way ends in
// [0, rows). A review checked 526M ids over 8,035 table sizes against Python's %. The scalar
// row_of took about 15% of the light tower's time at batch 256 (6,912 ids).
constexpr int64_t kVectorRowsMax = int64_t{1} << 40;

__attribute__((target("avx512f,avx512dq"), always_inline)) inline __m512i rows_of8(__m512i x, __m512i d,
                                                                                 __m512d inv, __m512i off) {
  constexpr int kFloor = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
  const __m512i zero = _mm512_setzero_si512();
  const __m512i q1 = _mm512_cvt_roundpd_epi64(_mm512_mul_pd(_mm512_cvtepi64_pd(x), inv), kFloor);
  const __m512i r1 = _mm512_sub_epi64(x, _mm512_mullo_epi64(q1, d));
  const __m512i q2 = _mm512_cvt_roundpd_epi64(_mm512_mul_pd(_mm512_cvtepi64_pd(r1), inv), kFloor);
  __m512i r = _mm512_sub_epi64(r1, _mm512_mullo_epi64(q2, d));
  r = _mm512_mask_add_epi64(r, _mm512_cmplt_epi64_mask(r, zero), r, d);
  r = _mm512_mask_sub_epi64(r, _mm512_cmpge_epi64_mask(r, d), r, d);
  return _mm512_add_epi64(r, off);
}

__attribute__((target("avx512f,avx512dq"))) void rows_of_avx512(const Lookup& k, const int64_t* ids, int64_t n,
                                                                 int64_t* out) {
  const __m512i d = _mm512_set1_epi64(k.rows), off = _mm512_set1_epi64(k.offset);
  const __m512d inv = _mm512_set1_pd(1.0 / static_cast<double>(k.rows));
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm512_storeu_si512(out + j, rows_of8(_mm512_loadu_si512(ids + j), d, inv, off));
  if (j < n) {
    const __mmask8 m = static_cast<__mmask8>((1u << (n - j)) - 1);
    _mm512_mask_storeu_epi64(out + j, m, rows_of8(_mm512_maskz_loadu_epi64(m, ids + j), d, inv, off));
  }
}

// log1p of 8 floats >= 0 (or +inf, NaN) in double: u = 1 + x (exact for 2^-29 <= x < 2^53),
// u = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s), s = (m - 1) / (m + 1),
// |s| <= 0.172, its series to s^11 (relative error < 1e-10: the float result is
// correctly rounded but for ties closer than that); x < 2^-20 takes x - x^2/2 + x^3/3
// (a conservative cut: near 0 the series is exact to float anyway), +inf and NaN pass
// through. Every float in [2^-21, 8) checked: at most one ulp off, 0.0008% of them. glibc's scalar log1pf was 2-5% of a
// call (one call per row and log1p column).
__attribute__((target("avx512f,avx512dq"), always_inline)) inline __m512d log1p8(__m512d x) {
  const __m512d one = _mm512_set1_pd(1.0);
  const __m512d u = _mm512_add_pd(one, x);
  __m512d e = _mm512_getexp_pd(u);
  __m512d m = _mm512_getmant_pd(u, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
  const __mmask8 big = _mm512_cmp_pd_mask(m, _mm512_set1_pd(1.4142135623730951), _CMP_GT_OQ);
  m = _mm512_mask_mul_pd(m, big, m, _mm512_set1_pd(0.5));
  e = _mm512_mask_add_pd(e, big, e, one);
  const __m512d s = _mm512_div_pd(_mm512_sub_pd(m, one), _mm512_add_pd(m, one));
  const __m512d s2 = _mm512_mul_pd(s, s);
  __m512d p = _mm512_set1_pd(1.0 / 11);
  p = _mm512_fmadd_pd(p, s2, _mm512_set1_pd(1.0 / 9));
  p = _mm512_fmadd_pd(p, s2, _mm512_set1_pd(1.0 / 7));
  p = _mm512_fmadd_pd(p, s2, _mm512_set1_pd(1.0 / 5));
  p = _mm512_fmadd_pd(p, s2, _mm512_set1_pd(1.0 / 3));
  p = _mm512_fmadd_pd(p, s2, one);
  const __m512d two_s = _mm512_add_pd(s, s);
  __m512d r = _mm512_fmadd_pd(e, _mm512_set1_pd(0.6931471805599453), _mm512_mul_pd(two_s, p));
  // small x: x - x^2/2 + x^3/3
  const __mmask8 small = _mm512_cmp_pd_mask(x, _mm512_set1_pd(0x1p-20), _CMP_LT_OQ);
  const __m512d t = _mm512_fmadd_pd(_mm512_fmsub_pd(x, _mm512_set1_pd(1.0 / 3), _mm512_set1_pd(0.5)), x, one);
  r = _mm512_mask_mul_pd(r, small, x, t);
  // +inf and NaN: x itself (log1p(inf) = inf)
  const __mmask8 odd = _mm512_cmp_pd_mask(x, _mm512_set1_pd(1.7976931348623157e308), _CMP_NLE_UQ);
  return _mm512_mask_mov_pd(r, odd, x);
}

__attribute__((target("avx512f,avx512dq"))) void log1p_avx512(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(v + i, _mm512_cvtpd_ps(log1p8(_mm512_cvtps_pd(_mm256_loadu_ps(v + i)))));
  if (i < n) {  // the tail through 8 local floats (masked 256-bit moves would need AVX-512VL)
    alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::copy(v + i, v + n, t);
    _mm256_store_ps(t, _mm512_cvtpd_ps(log1p8(_mm512_cvtps_pd(_mm256_load_ps(t)))));
    std::copy(t, t + (n - i), v + i);
  }
}

void log1p_nonneg(float* v, int64_t n) {
  if (kHasAvx512) return log1p_avx512(v, n);
  for (int64_t i = 0; i < n; ++i) v[i] = std::log1p(v[i]);
}

void rows_of_run(const Lookup& k, const int64_t* ids, int64_t n, int64_t* out) {
  if (kHasAvx512 && k.rows >= 2 && k.rows < kVectorRowsMax) return rows_of_avx512(k, ids, n, out);
  const Lookup kk = k;  // a local copy: the stores through `out` cannot alias it
  for (int64_t j = 0; j < n; ++j) out[j] = kk.row_of(ids[j]) + kk.offset;
}

// One lookup over bags b = 0..nb-1 (bag b: rows [start_b, bag_end[b]), starting at
// `start`), bag b into out + b * ld (columns [0, dim)); mean = sum / length (one
// multiply, as the portable module). On AVX-512 machines pool_lookup_avx512 for dims 16,
// 32, 64; on AVX2 + FMA machines pool_lookup_avx2; else the portable loop (the baseline ISA).
void pool_lookup_portable(float* out, int64_t ld, int64_t dim, bool mean, int64_t nb, const int64_t* bag_end,
                          int64_t start, const int64_t* rows, const uint8_t* base, int64_t stride, bool int8,
                          int64_t qdim) {
  const int64_t last = nb > 0 ? bag_end[nb - 1] : start;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t n = bag_end[b] - start;
    const float scale = mean && n > 1 ? 1.0f / static_cast<float>(n) : 1.0f;
    pool_bag_any(out + b * ld, dim, rows + start, n, last - start, base, stride, int8, qdim, scale);
    start = bag_end[b];
  }
}

void pool_lookup(float* out, int64_t ld, int64_t dim, bool mean, int64_t nb, const int64_t* bag_end,
                 int64_t start, const int64_t* rows, const uint8_t* base, int64_t stride, bool int8,
                 int64_t qdim) {
  if (kHasAvx512 && (dim == 16 || dim == 32 || dim == 64))
    pool_lookup_avx512(out, ld, dim, mean, nb, bag_end, start, rows, base, stride, int8, qdim);
  else if (kHasAvx2)
    pool_lookup_avx2(out, ld, dim, mean, nb, bag_end, start, rows, base, stride, int8, qdim);
  else
    pool_lookup_portable(out, ld, dim, mean, nb, bag_end, start, rows, base, stride, int8, qdim);
}

// The fused tables' pointers (checked against the config) and every table row of the
// request: rows [N'] in (lookup, row) order, bag_end [L*B] (thread-local, reused).
struct Rows {
  std::vector<const uint8_t*>& base;
  std::vector<int64_t>& stride;
  std::vector<int64_t>& rows;
  std::vector<int64_t>& bag_end;

  // where lookup l's bag b starts in `rows` (B > 0)
  int64_t bag_start(int64_t l, int64_t B, int64_t b) const {
    const int64_t at = l * B + b;
    return at > 0 ? bag_end[static_cast<size_t>(at - 1)] : 0;
  }

  // pools lookup l's bags b0..b1-1 into out + (b - b0) * ld
  void pool(const Config& c, int64_t l, int64_t B, int64_t b0, int64_t b1, float* out, int64_t ld,
            bool int8) const {
    if (b1 <= b0) return;  // no rows (B = 0: bag_end may be empty)
    const Lookup& k = c.lookups[static_cast<size_t>(l)];
    const size_t g = static_cast<size_t>(k.group);
    const int64_t* ends = bag_end.data() + l * B;
    const int64_t start = bag_start(l, B, b0);
    pool_lookup(out, ld, k.dim, k.mean != 0, b1 - b0, ends + b0, start, rows.data(), base[g], stride[g], int8,
                c.group_dim[g]);
  }
};

// The fused tables against the config: count, shape, dtype, and every lookup's rows inside
// its table (rows come out of `id mod rows` + the lookup's offset: checking each lookup's
// range once bounds every row, so a corrupt config cannot read past a table).
void check_tables(const Config& c, at::TensorList tables, bool int8) {
  TORCH_CHECK(static_cast<int64_t>(tables.size()) == c.G, "rocketrec: ", c.G, " tables expected, got ",
              tables.size());
  for (int64_t g = 0; g < c.G; ++g) {
    const at::Tensor& t = tables[static_cast<size_t>(g)];
    const int64_t d = c.group_dim[static_cast<size_t>(g)];
    TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), "rocketrec: table ", g, " must be a contiguous 2-D tensor");
    if (int8) {
      TORCH_CHECK(t.scalar_type() == at::kByte && t.size(1) == d + 8, "rocketrec: int8 table ", g,
                  " must be uint8 [R, ", d + 8, "]");
    } else {
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.size(1) == d, "rocketrec: table ", g,
                  " must be float32 [R, ", d, "]");
    }
  }
  for (const Lookup& k : c.lookups)
    TORCH_CHECK(k.group >= 0 && k.group < c.G && k.offset >= 0 &&
                    k.offset + k.rows <= tables[static_cast<size_t>(k.group)].size(0) &&
                    k.dim <= c.group_dim[static_cast<size_t>(k.group)],
                "rocketrec: a lookup's rows lie outside table ", k.group);
}

Rows table_rows(const Config& c, Work& w, at::TensorList tables, bool int8, int64_t B) {
  check_tables(c, tables, int8);
  WorkBuffers& wb = w.buf;
  Rows r{wb.base, wb.stride, wb.rows, wb.bag_end};
  r.base.resize(static_cast<size_t>(c.G));
  r.stride.resize(static_cast<size_t>(c.G));
  for (int64_t g = 0; g < c.G; ++g) {
    const at::Tensor& t = tables[static_cast<size_t>(g)];
    r.base[static_cast<size_t>(g)] = static_cast<const uint8_t*>(t.data_ptr());
    r.stride[static_cast<size_t>(g)] = t.size(1) * (int8 ? 1 : 4);
  }
  std::vector<int64_t>& rows = r.rows;
  std::vector<int64_t>& bag_end = r.bag_end;
  // `rows` is a buffer that only grows (no clear and refill per call: resize zero-fills)
  bag_end.resize(static_cast<size_t>(c.L * B));
  size_t used = 0;
  auto room = [&](size_t n) {
    if (rows.size() < used + n) rows.resize(std::max(2 * rows.size(), used + n + 1024));
  };
  for (int64_t l = 0; l < c.L; ++l) {
    int64_t first = 0;
    const int64_t n = w.plain_run(l, first);
    if (n >= 0) {  // one tight loop over the input's ids, its bag ends from the lengths
      const Lookup& k = c.lookups[static_cast<size_t>(l)];
      room(static_cast<size_t>(n));
      int64_t* out = rows.data() + used;
      rows_of_run(k, w.v + first, n, out);
      const int64_t idx = c.out_index[static_cast<size_t>(k.out)];
      const int64_t* len = w.in_len.data() + idx * B;
      int64_t* ends = bag_end.data() + l * B;
      int64_t e = static_cast<int64_t>(used);
      for (int64_t b = 0; b < B; ++b) ends[b] = e += len[b];
      used += static_cast<size_t>(n);
      continue;
    }
    if (B > 0) {  // buckets, and crosses of one id per source: one key per row, vectorized rows
      thread_local std::vector<int64_t> keys;
      if (keys.size() < static_cast<size_t>(B)) keys.resize(static_cast<size_t>(B));
      if (w.one_key_per_row(l, keys.data())) {  // context mode: none in row 0
        const int64_t b0 = w.context ? 1 : 0, nk = B - b0;
        room(static_cast<size_t>(nk));
        rows_of_run(c.lookups[static_cast<size_t>(l)], keys.data(), nk, rows.data() + used);
        int64_t* ends = bag_end.data() + l * B;
        if (b0 == 1) ends[0] = static_cast<int64_t>(used);
        for (int64_t b = b0; b < B; ++b) ends[b] = static_cast<int64_t>(used) + b - b0 + 1;
        used += static_cast<size_t>(nk);
        continue;
      }
    }
    w.for_lookup(
        l,
        [&](int64_t, int64_t, int64_t row) {
          room(1);
          rows[used++] = row;
        },
        [&](int64_t, int64_t b, int64_t) { bag_end[static_cast<size_t>(l * B + b)] = static_cast<int64_t>(used); });
  }
  return r;
}

// Pools every lookup into x [B, K] (embedding columns of each lookup, then the dense ones).
void pool_into(const Config& c, const Work& w, const Rows& r, const at::Tensor& dense, bool int8, int64_t B,
               float* xp) {
  TORCH_INTERNAL_ASSERT(!w.context);
  if (!c.tiles) std::fill(xp, xp + B * c.K, 0.0f);
  for (int64_t l = 0; l < c.L; ++l) r.pool(c, l, B, 0, B, xp + c.lookups[static_cast<size_t>(l)].col, c.K, int8);
  w.dense_rows(dense.data_ptr<float>(), xp + (c.K - c.D), c.K);
}

at::Tensor pooled(const Config& c, Work& w, const at::Tensor& dense,
                  at::TensorList tables, bool int8, int64_t B) {
  auto x = at::empty({B, c.K}, at::kFloat);
  pool_into(c, w, table_rows(c, w, tables, int8, B), dense, int8, B, x.data_ptr<float>());
  return x;
}

// Context mode, split: the context's share ctx [1, K] (zeros in the candidates' columns)
// and the candidates' own columns cand [M, Kc] (every column the context does not give,
// ascending), pooled straight into place; `cols` lists those Kc columns.
struct Split {
  at::Tensor ctx, cand;  // cand: only when asked for (else cand_p is a per-thread buffer)
  float* cand_p = nullptr;
  int64_t M = 0, kc = 0;
  std::vector<int64_t> cols;
  std::vector<int64_t> folded;  // the candidates' lookups left to `fold` (not in cand)
};
struct FoldSet;  // below: the first layer folded into single-id tables
bool folds(const FoldSet& fs, int64_t l);
bool at_most_one_row(const Rows& r, int64_t l, int64_t B, int64_t b0, int64_t b1);

// `fold` (or null): the candidates' lookups it folds with at most one row per candidate are
// left out of cand and listed in `folded` (light_first_layer_context adds their shares).
Split context_split(const at::Tensor& values, const at::Tensor& lengths, const at::Tensor& dense,
                    const at::Tensor& icfg, const at::Tensor& fcfg, at::TensorList tables, bool int8,
                    const FoldSet* fold = nullptr, bool cand_tensor = true) {
  const Config& c = cached_config(icfg, fcfg);
  const int64_t B = check_inputs(c, values, lengths, dense);
  TORCH_CHECK(B >= 2, "rocketrec: score_candidates needs the context row and >= 1 candidate");
  const Contiguous in(values, lengths, dense);
  const at::Tensor &vc = in.v(), &lc = in.l(), &dc = in.d();
  Work w(c, B, true);
  w.sources(vc, lc, dc);
  const Rows r = table_rows(c, w, tables, int8, B);
  const int64_t M = B - 1;
  // which columns the context gives: a lookup's, when the context gives its input
  std::vector<uint8_t> ctx_col(static_cast<size_t>(c.K), 0);
  std::vector<uint8_t> given(static_cast<size_t>(c.L), 0);
  for (int64_t l = 0; l < c.L; ++l) {
    const Lookup& k = c.lookups[static_cast<size_t>(l)];
    const int64_t kind = c.out_kind[static_cast<size_t>(k.out)];
    const int64_t idx = c.out_index[static_cast<size_t>(k.out)];
    bool g = false;
    if (kind == 0) g = w.in_len[static_cast<size_t>(idx * B)] > 0;
    if (kind == 2) g = w.ctx_gives[static_cast<size_t>(c.I + idx)];
    given[static_cast<size_t>(l)] = g;
    if (g) std::fill(ctx_col.begin() + k.col, ctx_col.begin() + k.col + k.dim, 1);
  }
  Split out;
  if (fold != nullptr)
    for (int64_t l = 0; l < c.L; ++l)
      if (!given[static_cast<size_t>(l)] && folds(*fold, l) && at_most_one_row(r, l, B, 1, B)) {
        const Lookup& k = c.lookups[static_cast<size_t>(l)];
        out.folded.push_back(l);
        std::fill(ctx_col.begin() + k.col, ctx_col.begin() + k.col + k.dim, 1);  // not a candidate column
      }
  const float* dp = dc.data_ptr<float>();
  for (int64_t j = 0; j < c.D; ++j) ctx_col[static_cast<size_t>(c.K - c.D + j)] = !std::isnan(dp[j]);
  std::vector<int64_t> pos(static_cast<size_t>(c.K), -1);  // column -> candidate column
  for (int64_t j = 0; j < c.K; ++j)
    if (!ctx_col[static_cast<size_t>(j)]) {
      pos[static_cast<size_t>(j)] = static_cast<int64_t>(out.cols.size());
      out.cols.push_back(j);
    }
  const int64_t kc = static_cast<int64_t>(out.cols.size());
  out.ctx = at::zeros({1, c.K}, at::kFloat);
  out.M = M, out.kc = kc;
  thread_local std::vector<float> cand_buf;  // the first layer's: no fresh block per call
  if (cand_tensor) {
    out.cand = at::empty({M, kc}, at::kFloat);
    out.cand_p = out.cand.data_ptr<float>();
  } else {
    if (cand_buf.size() < static_cast<size_t>(M * kc)) cand_buf.resize(static_cast<size_t>(M * kc));
    out.cand_p = cand_buf.data();
  }
  float* cp = out.ctx.data_ptr<float>();
  float* yp = out.cand_p;
  for (int64_t l = 0; l < c.L; ++l) {
    const Lookup& k = c.lookups[static_cast<size_t>(l)];
    if (given[static_cast<size_t>(l)]) {
      r.pool(c, l, B, 0, 1, cp + k.col, c.K, int8);
    } else if (std::find(out.folded.begin(), out.folded.end(), l) != out.folded.end()) {
      continue;
    } else {
      const int64_t at_col = k.dim > 0 ? pos[static_cast<size_t>(k.col)] : 0;
      TORCH_CHECK(k.dim == 0 || (at_col >= 0 && pos[static_cast<size_t>(k.col + k.dim - 1)] == at_col + k.dim - 1),
                  "rocketrec: lookup ", l, "'s columns overlap another's");
      r.pool(c, l, B, 1, B, yp + at_col, kc, int8);
    }
  }
  if (c.D > 0) {
    w.dense_row(dp, 0, cp + (c.K - c.D));  // the candidates' columns come out 0
    // the candidates' rows column by column (the context's columns are computed and dropped)
    thread_local std::vector<float> rows_d;
    if (rows_d.size() < static_cast<size_t>(M * c.D)) rows_d.resize(static_cast<size_t>(M * c.D));
    w.dense_rows(dp, rows_d.data(), c.D, 1, M);
    for (int64_t j = 0; j < c.D; ++j) {
      const int64_t q = pos[static_cast<size_t>(c.K - c.D + j)];
      if (q >= 0)
        for (int64_t m = 0; m < M; ++m) yp[m * kc + q] = rows_d[static_cast<size_t>(m * c.D + j)];
    }
  }
  return out;
}

at::Tensor light_features(const at::Tensor& values, const at::Tensor& lengths, const at::Tensor& dense,
                          const at::Tensor& icfg, const at::Tensor& fcfg, at::TensorList tables, bool int8,
                          int64_t out_dim) {
  const Config& c = cached_config(icfg, fcfg);
  TORCH_CHECK(out_dim == c.K, "rocketrec: out_dim ", out_dim, " != the config's ", c.K);
  const int64_t B = check_inputs(c, values, lengths, dense);
  const Contiguous in(values, lengths, dense);
  const at::Tensor &vc = in.v(), &lc = in.l(), &dc = in.d();
  Work w(c, B, false);
  w.sources(vc, lc, dc);
  return pooled(c, w, dc, tables, int8, B);
}

at::Tensor to_tensor(const std::vector<int64_t>& v) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
  if (!v.empty()) std::memcpy(t.data_ptr<int64_t>(), v.data(), v.size() * sizeof(int64_t));
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> light_features_context(
    const at::Tensor& values, const at::Tensor& lengths, const at::Tensor& dense, const at::Tensor& icfg,
    const at::Tensor& fcfg, at::TensorList tables, bool int8) {
  Split sp = context_split(values, lengths, dense, icfg, fcfg, tables, int8);
  return {sp.ctx, sp.cand, to_tensor(sp.cols)};
}

// sum(y) and sum(y^2) of n floats, in float64: AVX2 keeps 4 + 4 lanes of each (a single
// float64 chain waits on every add), the portable loop 4 partial sums.
__attribute__((target("avx2,fma"))) void moments_avx2(const float* y, int64_t n, double& s, double& ss) {
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd(), q0 = _mm256_setzero_pd(),
          q1 = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(y + j);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    a0 = _mm256_add_pd(a0, lo);
    a1 = _mm256_add_pd(a1, hi);
    q0 = _mm256_fmadd_pd(lo, lo, q0);
    q1 = _mm256_fmadd_pd(hi, hi, q1);
  }
  alignas(32) double t[4], u[4];
  _mm256_store_pd(t, _mm256_add_pd(a0, a1));
  _mm256_store_pd(u, _mm256_add_pd(q0, q1));
  s = (t[0] + t[1]) + (t[2] + t[3]);
  ss = (u[0] + u[1]) + (u[2] + u[3]);
  for (; j < n; ++j) {
    s += y[j];
    ss += static_cast<double>(y[j]) * y[j];
  }
}

// sum(x) and sum(x^2) of each of R rows of n floats (row stride ld), in float64, AVX-512:
// 16 floats a step as two 8-lane halves, the last n % 16 by a masked load; the rows in one
// loop (no call per row: the rows' dependency chains overlap)
__attribute__((target("avx512f,avx512dq,avx2,fma"))) void moments_rows_avx512(const float* x, int64_t ld,
                                                                              int64_t R, int64_t n, double* s,
                                                                              double* ss) {
  const int64_t full = n / 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n % 16)) - 1u);
  for (int64_t r = 0; r < R; ++r) {
    const float* y = x + r * ld;
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd(), q0 = _mm512_setzero_pd(),
            q1 = _mm512_setzero_pd();
    for (int64_t i = 0; i <= full; ++i) {
      const __m512 v = i < full ? _mm512_loadu_ps(y + 16 * i) : _mm512_maskz_loadu_ps(tail, y + 16 * i);
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
      const __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
      a0 = _mm512_add_pd(a0, lo);
      a1 = _mm512_add_pd(a1, hi);
      q0 = _mm512_fmadd_pd(lo, lo, q0);
      q1 = _mm512_fmadd_pd(hi, hi, q1);
    }
    s[r] = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
    ss[r] = _mm512_reduce_add_pd(_mm512_add_pd(q0, q1));
  }
}

void moments(const float* y, int64_t n, double& s, double& ss) {
  if (kHasAvx512) return moments_rows_avx512(y, n, 1, n, &s, &ss);
  if (kHasAvx2) return moments_avx2(y, n, s, ss);
  double s4[4] = {0, 0, 0, 0}, ss4[4] = {0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    for (int q = 0; q < 4; ++q) {
      const double v = y[j + q];
      s4[q] += v;
      ss4[q] += v * v;
    }
  for (; j < n; ++j) {
    s4[0] += y[j];
    ss4[0] += static_cast<double>(y[j]) * y[j];
  }
  s = (s4[0] + s4[1]) + (s4[2] + s4[3]);
  ss = (ss4[0] + ss4[1]) + (ss4[2] + ss4[3]);
}

// mean and 1 / sqrt(var + eps) of R rows from their sum(x), sum(x^2) over K columns; a row
// whose var * K passes FLT_MAX gets mean 0, rstd 0 (returns whether any did)
bool row_stats_scalar(const double* s, const double* ss, int64_t R, int64_t K, double eps, float* mean,
                      float* rstd) {
  bool overflow = false;
  for (int64_t r = 0; r < R; ++r) {
    const double m = s[r] / static_cast<double>(K);
    const double var = std::max(ss[r] / static_cast<double>(K) - m * m, 0.0);
    const bool over = var * static_cast<double>(K) > static_cast<double>(FLT_MAX);
    overflow |= over;
    mean[r] = over ? 0.0f : static_cast<float>(m);
    rstd[r] = over ? 0.0f : static_cast<float>(1.0 / std::sqrt(var + eps));
  }
  return overflow;
}

// the same, 8 rows at a time (a row's divides and square root would wait on each other)
__attribute__((target("avx512f,avx512dq,avx2,fma"))) bool row_stats_avx512(const double* s, const double* ss,
                                                                           int64_t R, int64_t K, double eps,
                                                                           float* mean, float* rstd) {
  const __m512d k = _mm512_set1_pd(static_cast<double>(K)), e = _mm512_set1_pd(eps),
                one = _mm512_set1_pd(1.0), zero = _mm512_setzero_pd(),
                fmax = _mm512_set1_pd(static_cast<double>(FLT_MAX));
  __mmask8 any = 0;
  for (int64_t r = 0; r < R; r += 8) {  // the last rows by masks: every row takes the same
    // instructions (the compiler may fuse m * m into the subtraction: a scalar tail would not)
    const __mmask8 rows = R - r >= 8 ? static_cast<__mmask8>(0xff) : static_cast<__mmask8>((1u << (R - r)) - 1u);
    const __m512d m = _mm512_div_pd(_mm512_maskz_loadu_pd(rows, s + r), k);
    // max(zero, v): a NaN v stays NaN, as std::max(v, 0.0) (vmaxpd returns its second operand)
    const __m512d var =
        _mm512_max_pd(zero, _mm512_sub_pd(_mm512_div_pd(_mm512_maskz_loadu_pd(rows, ss + r), k), _mm512_mul_pd(m, m)));
    const __mmask8 over = _mm512_mask_cmp_pd_mask(rows, _mm512_mul_pd(var, k), fmax, _CMP_GT_OQ);
    any |= over;
    const __m512d rs = _mm512_div_pd(one, _mm512_sqrt_pd(_mm512_add_pd(var, e)));
    alignas(32) float mt[8], rt[8];
    _mm256_store_ps(mt, _mm512_cvtpd_ps(_mm512_mask_mov_pd(m, over, zero)));
    _mm256_store_ps(rt, _mm512_cvtpd_ps(_mm512_mask_mov_pd(rs, over, zero)));
    const int64_t cnt = std::min<int64_t>(8, R - r);
    std::copy(mt, mt + cnt, mean + r);
    std::copy(rt, rt + cnt, rstd + r);
  }
  return any != 0;
}

bool row_stats(const double* s, const double* ss, int64_t R, int64_t K, double eps, float* mean, float* rstd) {
  if (kHasAvx512) return row_stats_avx512(s, ss, R, K, eps, mean, rstd);
  return row_stats_scalar(s, ss, R, K, eps, mean, rstd);
}

// A tower that starts LayerNorm(K) -> Linear(K, H), folded: for a row x,
//   h = rstd * (W(g*x) - mean * W g) + (W beta + b),   mean, rstd from sum(x), sum(x^2)
// (statistics in float64). wg_t = (W * g)^T [K, H], wg_sum = W g [1, H], b_eff =
// W beta + b [1, H]; eps is the LayerNorm's.
struct FirstLayer {
  const float* wg_t;
  const float* wg_sum;
  const float* b_eff;
  int64_t K, H;
  double eps;
  at::Tensor keep_t, keep_s, keep_b;  // contiguous copies, if the inputs were not

  FirstLayer(const at::Tensor& t, const at::Tensor& s, const at::Tensor& b, int64_t k, double e)
      : K(k), eps(e) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == K && t.scalar_type() == at::kFloat,
                "rocketrec: wg_t must be float32 [", K, ", H]");
    H = t.size(1);
    TORCH_CHECK(s.numel() == H && b.numel() == H && s.scalar_type() == at::kFloat &&
                    b.scalar_type() == at::kFloat,
                "rocketrec: wg_sum and b_eff must be float32 with H = ", H, " entries");
    keep_t = t.contiguous(), keep_s = s.contiguous(), keep_b = b.contiguous();
    wg_t = keep_t.data_ptr<float>(), wg_sum = keep_s.data_ptr<float>(), b_eff = keep_b.data_ptr<float>();
  }

  // The rows' LayerNorm statistics: x [R, n] (row stride ld) the rows' own columns,
  // (cs, css) the context's sum(x), sum(x^2) (0 without one), (rs, rss) per row those of
  // the folded lookups (null without) -> mean [R], rstd [R] (all
  // rows first: independent rows, their divides and square roots overlap). Returns whether
  // a row overflows: torch's float32 LayerNorm (the reference) overflows its sum of
  // squares beyond |x| ~ 1e19: rstd 0, the row normalized to 0, h = W beta + b.
  bool stats(const float* x, int64_t ld, int64_t R, int64_t n, double cs, double css, const double* rs,
             const double* rss, float* mean, float* rstd) const {
    thread_local std::vector<double> s_v, ss_v;
    s_v.resize(static_cast<size_t>(R));
    ss_v.resize(static_cast<size_t>(R));
    if (n == 0)  // no columns (the lean candidates: all in rs, rss)
      std::fill(s_v.begin(), s_v.end(), 0.0), std::fill(ss_v.begin(), ss_v.end(), 0.0);
    else if (kHasAvx512)
      moments_rows_avx512(x, ld, R, n, s_v.data(), ss_v.data());
    else
      for (int64_t r = 0; r < R; ++r) moments(x + r * ld, n, s_v[static_cast<size_t>(r)], ss_v[static_cast<size_t>(r)]);
    for (int64_t r = 0; r < R; ++r) {
      s_v[static_cast<size_t>(r)] += cs;
      ss_v[static_cast<size_t>(r)] += css;
    }
    if (rs != nullptr)  // the folded lookups' share (FoldSet)
      for (int64_t r = 0; r < R; ++r) {
        s_v[static_cast<size_t>(r)] += rs[r];
        ss_v[static_cast<size_t>(r)] += rss[r];
      }
    return row_stats(s_v.data(), ss_v.data(), R, K, eps, mean, rstd);
  }

  // h [R, H] holds W(g*y) per row (+ pc [H] = W(g*c), when given) -> the first layer's output
  void affine(float* h, int64_t R, const float* pc, const float* mean, const float* rstd) const {
    for (int64_t r = 0; r < R; ++r) {
      float* hm = h + r * H;
      const float mf = mean[r], rs = rstd[r];
      if (pc != nullptr)
        for (int64_t k = 0; k < H; ++k) hm[k] = (pc[k] + hm[k] - mf * wg_sum[k]) * rs + b_eff[k];
      else
        for (int64_t k = 0; k < H; ++k) hm[k] = (hm[k] - mf * wg_sum[k]) * rs + b_eff[k];
    }
  }
};

// out [R, H] = x [R, n] (row stride ld) @ w [n, H], H % 8 == 0, in AVX2 registers: blocks
// of RB rows x NV vectors of 8 columns (at most 3 x 4: 12 accumulators). At these sizes
// (K ~ 100, H ~ 32) MKL's packing and dispatch cost more than they save.
template <int RB, int NV>
__attribute__((target("avx2,fma"), always_inline)) inline void mm_block(const float* x, int64_t ld, int64_t n,
                                                                        const float* w, int64_t H, float* out) {
  __m256 acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; ++k) {
    const float* wk = w + k * H;
    for (int r = 0; r < RB; ++r) {
      const __m256 xv = _mm256_set1_ps(x[r * ld + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wk + 8 * v), acc[r][v]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + r * H + 8 * v, acc[r][v]);
}

template <int NV>
__attribute__((target("avx2,fma"))) void mm_cols_avx2(const float* x, int64_t ld, int64_t R, int64_t n,
                                                     const float* w, int64_t H, float* out) {
  int64_t r = 0;
  for (; r + 3 <= R; r += 3) mm_block<3, NV>(x + r * ld, ld, n, w, H, out + r * H);
  if (R - r == 2) mm_block<2, NV>(x + r * ld, ld, n, w, H, out + r * H);
  if (R - r == 1) mm_block<1, NV>(x + r * ld, ld, n, w, H, out + r * H);
}

// The first layer's affine step, applied to a product's rows before they are stored:
// h = (acc + pc + pr - mean * wg_sum) * rstd + b_eff (pc: the context's share [H], pr: a
// share per row [R, H] (the folded lookups'), each or both null); the column pointers start
// at the block's first column, mean / rstd / pr at its first row.
struct Epilogue {
  const float* mean;
  const float* rstd;
  const float* wg_sum;
  const float* b_eff;
  const float* pc;
  const float* pr;
};

// AVX-512: blocks of RB rows x NV vectors of 16 columns (at most 6 x 2: 12 accumulators)
template <int RB, int NV>
__attribute__((target("avx512f,avx2,fma"), always_inline)) inline void mm_block512(const float* x, int64_t ld,
                                                                                  int64_t n, const float* w,
                                                                                  int64_t H, float* out,
                                                                                  const Epilogue* e) {
  __m512 acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; ++k) {
    __m512 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(w + k * H + 16 * v);
    for (int r = 0; r < RB; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ld + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(xv, wv[v], acc[r][v]);
    }
  }
  if (e != nullptr)
    for (int r = 0; r < RB; ++r) {
      const __m512 m = _mm512_set1_ps(e->mean[r]), rs = _mm512_set1_ps(e->rstd[r]);
      for (int v = 0; v < NV; ++v) {
        __m512 t = acc[r][v];
        if (e->pc != nullptr) t = _mm512_add_ps(t, _mm512_loadu_ps(e->pc + 16 * v));
        if (e->pr != nullptr) t = _mm512_add_ps(t, _mm512_loadu_ps(e->pr + r * H + 16 * v));
        t = _mm512_fnmadd_ps(m, _mm512_loadu_ps(e->wg_sum + 16 * v), t);
        acc[r][v] = _mm512_fmadd_ps(t, rs, _mm512_loadu_ps(e->b_eff + 16 * v));
      }
    }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + r * H + 16 * v, acc[r][v]);
}

template <int NV>
__attribute__((target("avx512f,avx2,fma"))) void mm_cols_avx512(const float* x, int64_t ld, int64_t R, int64_t n,
                                                               const float* w, int64_t H, float* out,
                                                               const Epilogue* e) {
  Epilogue at = e != nullptr ? *e : Epilogue{};
  const Epilogue* ep = e != nullptr ? &at : nullptr;
  int64_t r = 0;
  for (; r + 6 <= R; r += 6) {
    mm_block512<6, NV>(x + r * ld, ld, n, w, H, out + r * H, ep);
    if (ep != nullptr) {
      at.mean += 6, at.rstd += 6;
      if (at.pr != nullptr) at.pr += 6 * H;
    }
  }
  switch (R - r) {
    case 5: mm_block512<5, NV>(x + r * ld, ld, n, w, H, out + r * H, ep); break;
    case 4: mm_block512<4, NV>(x + r * ld, ld, n, w, H, out + r * H, ep); break;
    case 3: mm_block512<3, NV>(x + r * ld, ld, n, w, H, out + r * H, ep); break;
    case 2: mm_block512<2, NV>(x + r * ld, ld, n, w, H, out + r * H, ep); break;
    case 1: mm_block512<1, NV>(x + r * ld, ld, n, w, H, out + r * H, ep); break;
    default: break;
  }
}

// AVX-512 product, H % 16 == 0: column blocks of 32 (the last may be 16)
void mm_avx512(const float* x, int64_t ld, int64_t R, int64_t n, const float* w, int64_t H, float* out,
               const Epilogue* e) {
  for (int64_t h0 = 0; h0 < H; h0 += 32) {
    Epilogue eh = e != nullptr ? *e : Epilogue{};
    if (e != nullptr) {
      eh.wg_sum += h0, eh.b_eff += h0;
      if (eh.pc != nullptr) eh.pc += h0;
      if (eh.pr != nullptr) eh.pr += h0;
    }
    const Epilogue* ep = e != nullptr ? &eh : nullptr;
    if (H - h0 >= 32)
      mm_cols_avx512<2>(x, ld, R, n, w + h0, H, out + h0, ep);
    else
      mm_cols_avx512<1>(x, ld, R, n, w + h0, H, out + h0, ep);
  }
}

void rows_times(const float* x, int64_t ld, int64_t R, int64_t n, const float* w, int64_t H, float* out) {
  if (kHasAvx512 && H % 16 == 0) return mm_avx512(x, ld, R, n, w, H, out, nullptr);
  if (kHasAvx2 && H % 8 == 0) {
    for (int64_t h0 = 0; h0 < H; h0 += 32) {  // column blocks of 32 (the last may be 8..24)
      switch ((H - h0) >= 32 ? 4 : (H - h0) / 8) {
        case 4: mm_cols_avx2<4>(x, ld, R, n, w + h0, H, out + h0); break;
        case 3: mm_cols_avx2<3>(x, ld, R, n, w + h0, H, out + h0); break;
        case 2: mm_cols_avx2<2>(x, ld, R, n, w + h0, H, out + h0); break;
        default: mm_cols_avx2<1>(x, ld, R, n, w + h0, H, out + h0);
      }
    }
    return;
  }
  at::Tensor xt = at::from_blob(const_cast<float*>(x), {R, n}, {ld, 1}, at::kFloat);
  at::Tensor wt = at::from_blob(const_cast<float*>(w), {n, H}, at::kFloat);
  at::Tensor ot = at::from_blob(out, {R, H}, {H, 1}, at::kFloat);
  at::mm_out(ot, xt, wt);
}

// The folded lookups' share of R rows (FoldSet): pr [R, H] of W(g*x) and per row (rs, rss)
// of sum(x), sum(x^2); all null when no lookup is folded.
struct RowShare {
  const float* pr = nullptr;
  const double* rs = nullptr;
  const double* rss = nullptr;
};

// h [R, H] = the first layer of rows x [R, n] (row stride ld) with weights w [n, H] (wg_t's
// rows of those n columns), plus the context's share pc [H] and moments (cs, css) and the
// folded lookups' share `fold` when given. On AVX-512 (H % 16 == 0) the affine step runs on
// the product's registers.
void first_layer_rows(const FirstLayer& f, const float* x, int64_t ld, int64_t R, int64_t n, const float* w,
                      const float* pc, double cs, double css, float* h, const RowShare& fold = {}) {
  thread_local std::vector<float> mean_v, rstd_v;
  mean_v.resize(static_cast<size_t>(R));
  rstd_v.resize(static_cast<size_t>(R));
  const bool overflow = f.stats(x, ld, R, n, cs, css, fold.rs, fold.rss, mean_v.data(), rstd_v.data());
  if (kHasAvx512 && f.H % 16 == 0) {
    const Epilogue e{mean_v.data(), rstd_v.data(), f.wg_sum, f.b_eff, pc, fold.pr};
    mm_avx512(x, ld, R, n, w, f.H, h, &e);
  } else {
    rows_times(x, ld, R, n, w, f.H, h);
    if (fold.pr != nullptr)
      for (int64_t i = 0; i < R * f.H; ++i) h[i] += fold.pr[i];
    f.affine(h, R, pc, mean_v.data(), rstd_v.data());
  }
  if (overflow)  // rstd 0 marks those rows (inf * 0 would be NaN): h = W beta + b
    for (int64_t r = 0; r < R; ++r)
      if (rstd_v[static_cast<size_t>(r)] == 0.0f) std::copy(f.b_eff, f.b_eff + f.H, h + r * f.H);
}

// -- The first layer folded into the tables of single-id lookups ---------------------------
//
// A lookup whose bags hold at most one row each (a scalar id, a bucket, a cross of those)
// adds to a row's first layer W(g*e) over its columns, e its table row: a function of the
// table row alone. FoldSet holds, per such lookup, P[row] = sum_j e_j wg_t[col + j] ([H])
// with sum(e) and sum(e^2) (float64) for the LayerNorm statistics, computed once per model
// (its tables, wg_t and icfg; the first call pays: about 0.18 s per million table rows
// here). A request's row then pays one H-wide add per folded lookup instead of copying e
// into x and dim x H multiply-adds: the product keeps the lists' and dense columns only.
// Folding costs memory: (H + 4) floats per table row, against dim (or dim + 8 bytes in
// int8). Lookups fold smallest table first while the model's folded bytes fit the budget
// (ROCKETREC_OPS_FOLD_MB, default 1024; 0 = never fold; rocketrec::fold_budget_mb sets it
// at run time); the others are pooled as before. A FoldSet is shared by every thread and
// entry point of a model, found by the identity (storage, offset, version) of the model's
// tensors (fold_set below); it holds weak references to their storages, so a freed model's
// set is let go (a hot swap does not accumulate sets) and an address reused by another
// model never matches an old set; an in-place change of a table or of wg_t (its version)
// builds a new one and drops the old.
struct FreeFloats {
  void operator()(float* p) const { std::free(p); }
};
using FoldBuffer = std::unique_ptr<float[], FreeFloats>;

// n floats, on 2 MB pages from 2 MB up (madvise: random rows over tens of MB otherwise miss
// the TLB on most reads; the Predictor puts the tables on them too, ROCKETREC_HUGE_PAGES=0
// turns both off)
FoldBuffer fold_buffer(size_t n) {
  constexpr size_t kHuge = size_t{2} << 20;
  static const bool huge_ok = [] {
    const char* e = std::getenv("ROCKETREC_HUGE_PAGES");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  const size_t bytes = std::max<size_t>(n * sizeof(float), 64);
  const bool huge = huge_ok && bytes >= kHuge;
  const size_t align = huge ? kHuge : 64;
  void* p = std::aligned_alloc(align, (bytes + align - 1) / align * align);
  TORCH_CHECK(p != nullptr, "rocketrec: out of memory folding the first layer (", bytes,
              " bytes; ROCKETREC_OPS_FOLD_MB lowers the budget)");
  if (huge) ::madvise(p, (bytes + align - 1) / align * align, MADV_HUGEPAGE);
  return FoldBuffer(static_cast<float*>(p));
}

struct FoldSet {
  int64_t H = 0, stride = 0;     // floats per folded row: H, then sum(e), sum(e^2) as 2 doubles
  std::vector<int64_t> slot;     // [L]: index into data, or -1
  std::vector<FoldBuffer> data;  // per folded lookup: [rows + 1, stride] (the last row zeros)
  int64_t bytes = 0;
  std::vector<int64_t> icfg;     // what it was folded from (besides the tables): another
  std::vector<float> wg;         // model's tensors of equal contents share the set
};

bool folds(const FoldSet& fs, int64_t l) { return fs.slot[static_cast<size_t>(l)] >= 0; }

std::atomic<int64_t>& fold_budget_mb_ref() {
  static std::atomic<int64_t> mb{[] {
    const char* v = std::getenv("ROCKETREC_OPS_FOLD_MB");
    if (v == nullptr || *v == '\0') return int64_t{1024};
    char* end = nullptr;
    const long long x = std::strtoll(v, &end, 10);
    if (end == v || *end != '\0' || x < 0) {
      std::fprintf(stderr, "rocketrec ops: ROCKETREC_OPS_FOLD_MB=%s is not a number of MiB >= 0: 1024 used\n", v);
      return int64_t{1024};
    }
    return static_cast<int64_t>(x);
  }()};
  return mb;
}

// rocketrec::fold_budget_mb(mb): sets the budget (mb >= 0; < 0 only reads it), returns the
// previous one. A model's next call folds again under a new budget > 0 (its old set
// dropped); under 0 nothing folds and built sets stay until their model is freed.
int64_t fold_budget_mb(int64_t mb) {
  return mb >= 0 ? fold_budget_mb_ref().exchange(mb) : fold_budget_mb_ref().load();
}

// Whether lookup l gives at most one id per row whatever the request: a scalar id input
// (max_ids 1), a bucket, a cross whose sources are all such.
bool single_id_lookup(const Config& c, int64_t l) {
  const Lookup& k = c.lookups[static_cast<size_t>(l)];
  const int64_t kind = c.out_kind[static_cast<size_t>(k.out)], idx = c.out_index[static_cast<size_t>(k.out)];
  auto one = [&](int64_t src) { return src >= c.I || c.id_cap[static_cast<size_t>(src)] == 1; };
  if (kind == 0) return one(idx);
  if (kind == 2) return true;
  for (int64_t j = c.cross_start[static_cast<size_t>(idx)]; j < c.cross_start[static_cast<size_t>(idx) + 1]; ++j)
    if (!one(c.cross_src[static_cast<size_t>(j)])) return false;
  return true;
}

std::shared_ptr<const FoldSet> build_fold_set(const Config& c, const at::Tensor& icfg,
                                              at::TensorList tables, bool int8,
                                              const at::Tensor& wg, int64_t H, int64_t budget_bytes) {
  auto fs = std::make_shared<FoldSet>();
  const float* wg_t = wg.data_ptr<float>();
  fs->icfg.assign(icfg.data_ptr<int64_t>(), icfg.data_ptr<int64_t>() + icfg.numel());
  fs->wg.assign(wg_t, wg_t + wg.numel());
  fs->H = H;
  fs->stride = (H + 4 + 3) / 4 * 4;  // rows 16-byte aligned
  fs->slot.assign(static_cast<size_t>(c.L), -1);
  // columns written by two lookups (not a layout pack_config writes) would not add up: no folding
  std::vector<uint8_t> used(static_cast<size_t>(c.K), 0);
  std::fill(used.end() - c.D, used.end(), 1);  // the dense columns
  for (const Lookup& k : c.lookups)
    for (int64_t j = k.col; j < k.col + k.dim; ++j) {
      if (j < 0 || j >= c.K || used[static_cast<size_t>(j)]) return fs;
      used[static_cast<size_t>(j)] = 1;
    }
  std::vector<int64_t> order;
  for (int64_t l = 0; l < c.L; ++l)
    if (c.lookups[static_cast<size_t>(l)].dim > 0 && single_id_lookup(c, l)) order.push_back(l);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return c.lookups[static_cast<size_t>(a)].rows < c.lookups[static_cast<size_t>(b)].rows;
  });
  constexpr int64_t kChunk = 256;
  std::vector<float> e, p(static_cast<size_t>(kChunk * H));
  for (int64_t l : order) {
    const Lookup& k = c.lookups[static_cast<size_t>(l)];
    const int64_t bytes = (k.rows + 1) * fs->stride * static_cast<int64_t>(sizeof(float));
    if (fs->bytes + bytes > budget_bytes) continue;
    const at::Tensor& t = tables[static_cast<size_t>(k.group)];
    const uint8_t* base = static_cast<const uint8_t*>(t.data_ptr());
    const int64_t tstride = t.size(1) * (int8 ? 1 : 4), qdim = c.group_dim[static_cast<size_t>(k.group)];
    // rows + 1: row `rows` is zeros (an empty bag's share, for score_candidates' lean path)
    FoldBuffer out = fold_buffer(static_cast<size_t>((k.rows + 1) * fs->stride));
    std::fill(out.get() + k.rows * fs->stride, out.get() + (k.rows + 1) * fs->stride, 0.0f);
    e.resize(static_cast<size_t>(kChunk * k.dim));
    for (int64_t r0 = 0; r0 < k.rows; r0 += kChunk) {
      const int64_t n = std::min(kChunk, k.rows - r0);
      for (int64_t i = 0; i < n; ++i) {  // the pooled values of a one-row bag, as the kernels make them
        const uint8_t* row = base + (k.offset + r0 + i) * tstride;
        float* ei = e.data() + i * k.dim;
        if (int8) {
          float sc, bi;
          scale_bias(row, qdim, sc, bi);
          for (int64_t j = 0; j < k.dim; ++j)
            ei[j] = kHasAvx2 ? std::fma(sc, static_cast<float>(row[j]), bi) : sc * static_cast<float>(row[j]) + bi;
        } else {
          std::memcpy(ei, row, static_cast<size_t>(k.dim) * sizeof(float));
        }
      }
      rows_times(e.data(), k.dim, n, k.dim, wg_t + k.col * H, H, p.data());
      for (int64_t i = 0; i < n; ++i) {
        float* o = out.get() + (r0 + i) * fs->stride;
        std::memcpy(o, p.data() + i * H, static_cast<size_t>(H) * sizeof(float));
        std::fill(o + H + 4, o + fs->stride, 0.0f);  // padding
        double sm = 0, sq = 0;
        moments(e.data() + i * k.dim, k.dim, sm, sq);
        std::memcpy(o + H, &sm, sizeof(double));
        std::memcpy(o + H + 2, &sq, sizeof(double));
      }
    }
    fs->slot[static_cast<size_t>(l)] = static_cast<int64_t>(fs->data.size());
    fs->data.push_back(std::move(out));
    fs->bytes += bytes;
  }
  return fs;
}

using Weak = c10::weak_intrusive_ptr<c10::StorageImpl>;
struct FoldEntry {
  std::vector<int64_t> key;
  std::vector<Weak> keep;  // the model's storages (icfg, wg_t, tables)
  std::shared_ptr<const FoldSet> set;
  bool alive() const {
    for (const Weak& w : keep)
      if (w.expired()) return false;
    return true;
  }
};

struct FoldStore {  // every live model's FoldSet (process-wide)
  std::mutex mu;
  std::vector<FoldEntry> all;
  std::atomic<int64_t> generation{0};  // fold_clear's count: part of every key
  void purge() {  // under mu
    all.erase(std::remove_if(all.begin(), all.end(), [](const FoldEntry& e) { return !e.alive(); }), all.end());
  }
};

FoldStore& fold_store() {
  static FoldStore* s = new FoldStore();  // never destroyed: threads may still call at exit
  return *s;
}

// A key: budget, int8, H, generation, then (storage, offset, version, numel) of icfg, wg_t
// and each table
constexpr size_t kKeyHead = 4, kKeyTables = kKeyHead + 8;

// Whether two keys name the same tensors (whatever their versions, budget or generation)
bool same_tensors(const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
  if (a.size() != b.size() || a[1] != b[1] || a[2] != b[2]) return false;
  for (size_t i = kKeyHead; i < a.size(); i += 4)
    if (a[i] != b[i] || a[i + 1] != b[i + 1] || a[i + 3] != b[i + 3]) return false;
  return true;
}

// rocketrec::fold_stats() -> [folded sets (models), folded lookups, bytes] over the live FoldSets
std::vector<int64_t> fold_stats() {
  FoldStore& store = fold_store();
  std::lock_guard<std::mutex> lock(store.mu);
  store.purge();
  std::vector<int64_t> out{0, 0, 0};
  std::vector<const FoldSet*> seen;  // entries may share a set (equal small tensors)
  for (const FoldEntry& e : store.all) {
    if (e.set->data.empty() || std::find(seen.begin(), seen.end(), e.set.get()) != seen.end()) continue;
    seen.push_back(e.set.get());
    out[0] += 1;
    out[1] += static_cast<int64_t>(e.set->data.size());
    out[2] += e.set->bytes;
  }
  return out;
}

// rocketrec::fold_clear() -> the number of sets dropped: every model folds again on its next
// call. For weights changed where the version counter does not see it (through `.data`, a
// numpy view, an inference tensor); an in-place op on the tensors themselves is seen.
int64_t fold_clear() {
  FoldStore& store = fold_store();
  std::lock_guard<std::mutex> lock(store.mu);
  store.purge();
  const auto n = static_cast<int64_t>(store.all.size());
  store.all.clear();
  store.generation.fetch_add(1);
  return n;
}

// The model's FoldSet (null when nothing folds): looked up by its tensors' identity, in a
// per-thread list first, then in the process-wide one (built there on a miss). The pointer
// stays valid until this thread's next call: its list holds the set. A set that can no
// longer be found (a table or wg_t changed in place: a new version; another budget;
// fold_clear) is dropped when its successor is built; a freed model's, at the next miss or
// within 1024 calls of each thread.
const FoldSet* fold_set(const Config& c, const at::Tensor& icfg,
                                        at::TensorList tables, bool int8, const at::Tensor& wg_t,
                                        int64_t H) {
  const int64_t budget = fold_budget_mb_ref().load();
  if (budget <= 0 || H <= 0 || !wg_t.is_contiguous() || wg_t.scalar_type() != at::kFloat || c.L == 0)
    return nullptr;
  using Entry = FoldEntry;
  FoldStore& store = fold_store();
  thread_local std::vector<int64_t> key;
  key.assign({budget, int8 ? 1 : 0, H, store.generation.load()});
  auto id = [&](const at::Tensor& t) {
    key.push_back(reinterpret_cast<intptr_t>(t.storage().unsafeGetStorageImpl()));
    key.push_back(t.storage_offset());
    key.push_back(t.is_inference() ? -1 : static_cast<int64_t>(t._version()));
    key.push_back(t.numel());
  };
  id(icfg);
  id(wg_t);
  for (const at::Tensor& t : tables) id(t);
  thread_local std::vector<Entry> mine;  // this thread's recent sets (a few models)
  thread_local uint32_t calls = 0;
  auto stale = [&](const Entry& e) { return !e.alive() || e.key[3] != key[3]; };
  if (++calls % 1024 == 0) {  // let a freed model's set go
    mine.erase(std::remove_if(mine.begin(), mine.end(), stale), mine.end());
    std::unique_lock<std::mutex> lock(store.mu, std::try_to_lock);
    if (lock.owns_lock()) store.purge();
  }
  for (const Entry& e : mine)  // a match is alive: its storages are this call's tensors'
    if (e.key == key) return e.set->data.empty() ? nullptr : e.set.get();
  mine.erase(std::remove_if(mine.begin(), mine.end(),
                            [&](const Entry& e) { return stale(e) || same_tensors(e.key, key); }),
             mine.end());
  std::vector<FoldEntry>& all = store.all;
  std::shared_ptr<const FoldSet> set;
  {
    std::lock_guard<std::mutex> lock(store.mu);
    store.purge();
    const Entry* hit = nullptr;
    for (const Entry& e : all)
      if (e.key == key) hit = &e;
    if (hit == nullptr) {
      // superseded sets of these tensors (older versions, another budget or generation)
      all.erase(std::remove_if(all.begin(), all.end(), [&](const Entry& e) { return same_tensors(e.key, key); }),
                all.end());
      // the same tables with equal icfg and wg_t in other tensors (AOTInductor's two entry
      // points hold their own copies of the small constants): the same folded tables
      const int64_t* ip = icfg.data_ptr<int64_t>();
      const float* wp = wg_t.data_ptr<float>();
      for (const Entry& e : all)
        if (std::equal(e.key.begin(), e.key.begin() + kKeyHead, key.begin()) &&
            std::equal(e.key.begin() + kKeyTables, e.key.end(), key.begin() + kKeyTables, key.end()) &&
            e.set->icfg.size() == static_cast<size_t>(icfg.numel()) && std::equal(e.set->icfg.begin(), e.set->icfg.end(), ip) &&
            e.set->wg.size() == static_cast<size_t>(wg_t.numel()) &&
            std::memcmp(e.set->wg.data(), wp, e.set->wg.size() * sizeof(float)) == 0)
          set = e.set;
      if (set == nullptr)
        set = build_fold_set(c, icfg, tables, int8, wg_t, H, std::min(budget, int64_t{1} << 30) << 20);
      std::vector<Weak> keep{Weak(icfg.storage().getWeakStorageImpl()), Weak(wg_t.storage().getWeakStorageImpl())};
      for (const at::Tensor& t : tables) keep.push_back(t.storage().getWeakStorageImpl());
      all.push_back({key, keep, set});
      hit = &all.back();
    }
    set = hit->set;
    Entry mine_e{key, hit->keep, set};
    if (mine.size() >= 16) mine.erase(mine.begin());
    mine.push_back(std::move(mine_e));
  }
  return set->data.empty() ? nullptr : set.get();
}

// Whether lookup l's bags b0..b1-1 hold at most one row each (differences of neighbouring
// bag ends: a loop the compiler vectorizes)
bool at_most_one_row(const Rows& r, int64_t l, int64_t B, int64_t b0, int64_t b1) {
  if (b1 <= b0) return true;
  const int64_t* ends = r.bag_end.data() + l * B;
  int64_t more = ends[b0] - r.bag_start(l, B, b0) > 1;
  for (int64_t b = b0 + 1; b < b1; ++b) more |= ends[b] - ends[b - 1] > 1;
  return more == 0;
}

// The folded lookups `use` (each with at most one row per bag) of rows b0..b1-1: pr [R, H]
// their W(g*x) summed, rs / rss [R] their sum(x), sum(x^2) (folded_share below).
struct FoldedLookup {
  const float* data;
  int64_t offset;
  const int64_t* ends;
  int64_t start;  // where bag b0 starts
};

template <int NV>
__attribute__((target("avx512f,avx2,fma"))) void gather_folded_avx512(const FoldedLookup* u, size_t nu,
                                                                      const int64_t* rows, int64_t stride,
                                                                      int64_t b0, int64_t R, float* pr,
                                                                      double* rs, double* rss) {
  for (int64_t i = 0; i < R; ++i) {
    const int64_t b = b0 + i;
    __m512 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_setzero_ps();
    double s = 0, ss = 0;
    for (size_t q = 0; q < nu; ++q) {
      const FoldedLookup& f = u[q];
      const int64_t start = i == 0 ? f.start : f.ends[b - 1];
      if (i + 4 < R) {  // the row 4 ahead
        const int64_t s4 = f.ends[b + 3];
        if (f.ends[b + 4] > s4) {
          const char* p4 = reinterpret_cast<const char*>(f.data + (rows[s4] - f.offset) * stride);
          for (int64_t o = 0; o < stride * 4; o += 64) __builtin_prefetch(p4 + o);  // every line it spans
          __builtin_prefetch(p4 + stride * 4 - 1);
        }
      }
      if (f.ends[b] == start) continue;  // an empty bag adds nothing
      const float* p = f.data + (rows[start] - f.offset) * stride;
      for (int v = 0; v < NV; ++v) acc[v] = _mm512_add_ps(acc[v], _mm512_loadu_ps(p + 16 * v));
      double a, c;
      std::memcpy(&a, p + 16 * NV, sizeof(double));
      std::memcpy(&c, p + 16 * NV + 2, sizeof(double));
      s += a;
      ss += c;
    }
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(pr + i * 16 * NV + 16 * v, acc[v]);
    rs[i] = s;
    rss[i] = ss;
  }
}

// o [H] += a folded row's H floats; s, ss += its sum(e), sum(e^2) (the portable gathers)
inline void add_folded_row(float* o, const float* p, int64_t H, double& s, double& ss) {
  for (int64_t k = 0; k < H; ++k) o[k] += p[k];
  double a, cc;
  std::memcpy(&a, p + H, sizeof(double));
  std::memcpy(&cc, p + H + 2, sizeof(double));
  s += a;
  ss += cc;
}

// The folded lookups' share (RowShare, in per-thread buffers valid until the next call) of
// rows b0..b1-1
RowShare folded_share(const FoldSet& fs, const Config& c, const Rows& r, const std::vector<int64_t>& use,
                      int64_t B, int64_t b0, int64_t b1) {
  thread_local std::vector<float> pr_v;
  thread_local std::vector<double> rs_v, rss_v;
  const int64_t H = fs.H, R = b1 - b0, st = fs.stride;
  pr_v.resize(static_cast<size_t>(std::max<int64_t>(R, 0) * H));
  rs_v.resize(static_cast<size_t>(std::max<int64_t>(R, 0)));
  rss_v.resize(rs_v.size());
  float* pr = pr_v.data();
  double *rs = rs_v.data(), *rss = rss_v.data();
  const RowShare share{pr, rs, rss};
  if (R <= 0) return share;  // no rows (B = 0: bag_end may be empty)
  thread_local std::vector<FoldedLookup> u;
  u.clear();
  for (int64_t l : use) {
    const Lookup& k = c.lookups[static_cast<size_t>(l)];
    u.push_back({fs.data[static_cast<size_t>(fs.slot[static_cast<size_t>(l)])].get(), k.offset,
                 r.bag_end.data() + l * B, r.bag_start(l, B, b0)});
  }
  const int64_t* rows = r.rows.data();
  if (kHasAvx512 && H % 16 == 0 && H <= 64) {
    switch (H / 16) {
      case 1: gather_folded_avx512<1>(u.data(), u.size(), rows, st, b0, R, pr, rs, rss); break;
      case 2: gather_folded_avx512<2>(u.data(), u.size(), rows, st, b0, R, pr, rs, rss); break;
      case 3: gather_folded_avx512<3>(u.data(), u.size(), rows, st, b0, R, pr, rs, rss); break;
      default: gather_folded_avx512<4>(u.data(), u.size(), rows, st, b0, R, pr, rs, rss);
    }
    return share;
  }
  std::fill(pr, pr + R * H, 0.0f);
  for (int64_t i = 0; i < R; ++i) {
    const int64_t b = b0 + i;
    float* o = pr + i * H;
    double s = 0, ss = 0;
    for (const FoldedLookup& f : u) {
      const int64_t start = i == 0 ? f.start : f.ends[b - 1];
      if (f.ends[b] == start) continue;
      const float* p = f.data + (rows[start] - f.offset) * st;
      add_folded_row(o, p, H, s, ss);
    }
    rs[i] = s;
    rss[i] = ss;
  }
  return share;
}

// The first layer's output h [rows, cols], per thread and entry point (slot 0 forward, 1
// score_candidates): reused from the last call when nothing else holds it (reused_tensor.h).
// Inside an AOTInductor or TorchScript graph h never leaves the call; one handed to Python
// is never reused (its Python object keeps a reference to it).
at::Tensor first_layer_out(int slot, int64_t rows, int64_t cols) {
  thread_local at::Tensor cache[2];
  return rocketrec::reused_tensor(cache[slot], {rows, cols}, at::kFloat);
}

// forward's first layer: the pooled rows x [B, K] -> h [B, H] (FirstLayer); the folded
// lookups (FoldSet) add their rows' shares, x keeps the other lookups' and the dense columns
at::Tensor light_first_layer(const at::Tensor& values, const at::Tensor& lengths, const at::Tensor& dense,
                             const at::Tensor& icfg, const at::Tensor& fcfg, at::TensorList tables, bool int8,
                             const at::Tensor& wg_t, const at::Tensor& wg_sum, const at::Tensor& b_eff,
                             double eps) {
  const Config& c = cached_config(icfg, fcfg);
  const FirstLayer f(wg_t, wg_sum, b_eff, c.K, eps);
  const int64_t B = check_inputs(c, values, lengths, dense);
  const Contiguous in(values, lengths, dense);
  const at::Tensor &vc = in.v(), &lc = in.l(), &dc = in.d();
  Work w(c, B, false);
  w.sources(vc, lc, dc);
  const Rows r = table_rows(c, w, tables, int8, B);
  at::Tensor h = first_layer_out(0, B, f.H);
  float* hp = h.data_ptr<float>();
  // x stays inside the call: a per-thread buffer (a fresh 100 KB block per call at batch
  // 256 cost malloc's trimming and page faults)
  thread_local std::vector<float> x;
  const FoldSet* fs = fold_set(c, icfg, tables, int8, wg_t, f.H);
  thread_local std::vector<int64_t> use, kept;
  use.clear();
  kept.clear();
  if (fs != nullptr)
    for (int64_t l = 0; l < c.L; ++l) {
      if (fs->slot[static_cast<size_t>(l)] >= 0 && at_most_one_row(r, l, B, 0, B))
        use.push_back(l);
      else
        kept.push_back(l);
    }
  if (use.empty()) {
    if (x.size() < static_cast<size_t>(B * c.K)) x.resize(static_cast<size_t>(B * c.K));
    float* xp = x.data();
    pool_into(c, w, r, dc, int8, B, xp);
    first_layer_rows(f, xp, c.K, B, c.K, f.wg_t, nullptr, 0.0, 0.0, hp);
    return h;
  }
  // x [B, n]: the kept lookups' columns side by side, then the dense ones; wx [n, H] their wg_t rows
  int64_t n = c.D;
  for (int64_t l : kept) n += c.lookups[static_cast<size_t>(l)].dim;
  thread_local std::vector<float> wx;
  if (x.size() < static_cast<size_t>(B * n)) x.resize(static_cast<size_t>(B * n));
  wx.resize(static_cast<size_t>(n * f.H));
  float* xp = x.data();
  int64_t at_col = 0;
  auto take_w = [&](int64_t col, int64_t cnt) {
    std::memcpy(wx.data() + at_col * f.H, f.wg_t + col * f.H, static_cast<size_t>(cnt * f.H) * sizeof(float));
  };
  for (int64_t l : kept) {
    const Lookup& k = c.lookups[static_cast<size_t>(l)];
    r.pool(c, l, B, 0, B, xp + at_col, n, int8);
    take_w(k.col, k.dim);
    at_col += k.dim;
  }
  w.dense_rows(dc.data_ptr<float>(), xp + at_col, n);
  take_w(c.K - c.D, c.D);
  first_layer_rows(f, xp, n, B, n, wx.data(), nullptr, 0.0, 0.0, hp, folded_share(*fs, c, r, use, B, 0, B));
  return h;
}

// -- score_candidates' lean path ------------------------------------------------------------
//
// When every lookup the candidates give is folded (FoldSet) and reads at most one id or key
// per candidate, each candidate's folded rows are found straight from the raw inputs: no
// per-input bookkeeping over every row (Work::sources), no bag ends, no candidate columns
// but the dense ones; the context's share is pooled from row 0 alone. On ads_ctr (1 context
// x 200 candidates) that bookkeeping and the general gather were about a third of a call.
// candidates_lean returns false, having written nothing, when a request does not qualify (a
// lookup not folded, a candidate with two ids, a cross source the context gives twice...):
// the general path (context_split) then runs. Both compute the same rows and sums.

// The ids of id input i's candidates (rows 1..B-1), each bag holding at most one: ids[m],
// and has[m] = 0 for an empty bag (ids[m] then 0). `first` indexes the input's first id in
// values. When every bag holds one id, ids point into values (no copy) and `has` is left
// unwritten (*all = true); else the ids go to `id`. Null when a candidate has two ids.
const int64_t* candidate_ids(const int64_t* v, const int64_t* l, int64_t B, int64_t i, int64_t first, int64_t* id,
                             uint8_t* has, bool* all) {
  const int64_t M = B - 1;
  const int64_t* li = l + i * B + 1;  // lengths >= 0 (check_inputs)
  int64_t all_one = 1, over = 0;
  if (kHasAvx512) {
    uint64_t sum = 0;
    over = static_cast<int64_t>(lengths_scan_avx512(li, M, 1, sum));  // a length above 1
    all_one = sum == static_cast<uint64_t>(M);
  } else {
    for (int64_t m = 0; m < M; ++m) {
      all_one &= li[m] == 1;
      over |= li[m] > 1;
    }
  }
  if (over) return nullptr;
  const int64_t* p = v + first + l[i * B];  // after the context's bag
  *all = all_one != 0;
  if (all_one) return p;
  int64_t at = 0;
  for (int64_t m = 0; m < M; ++m) {
    has[m] = static_cast<uint8_t>(li[m]);
    id[m] = li[m] != 0 ? p[at] : 0;
    at += li[m];
  }
  return id;
}

// ids[0..n) -> their rows' addresses in a folded table: base + (ids[j] mod k.rows) * stride
// floats (Python's %), one pass (rows_of_run, then the addresses, was two over the candidates)
__attribute__((target("avx512f,avx512dq"))) void row_ptrs_avx512(const Lookup& k, const int64_t* ids, int64_t n,
                                                                  const float* base, int64_t stride,
                                                                  const float** out) {
  const __m512i d = _mm512_set1_epi64(k.rows), zero = _mm512_setzero_si512();
  const __m512i sb = _mm512_set1_epi64(stride * static_cast<int64_t>(sizeof(float)));
  const __m512i b = _mm512_set1_epi64(static_cast<int64_t>(reinterpret_cast<uintptr_t>(base)));
  const __m512d inv = _mm512_set1_pd(1.0 / static_cast<double>(k.rows));
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m512i r = rows_of8(_mm512_loadu_si512(ids + j), d, inv, zero);
    _mm512_storeu_si512(out + j, _mm512_add_epi64(b, _mm512_mullo_epi64(r, sb)));
  }
  if (j < n) {
    const __mmask8 m = static_cast<__mmask8>((1u << (n - j)) - 1);
    const __m512i r = rows_of8(_mm512_maskz_loadu_epi64(m, ids + j), d, inv, zero);
    _mm512_mask_storeu_epi64(out + j, m, _mm512_add_epi64(b, _mm512_mullo_epi64(r, sb)));
  }
}

void row_ptrs(const Lookup& k, const int64_t* ids, int64_t n, const float* base, int64_t stride, const float** out,
              int64_t* scratch) {
  if (kHasAvx512 && k.rows >= 2 && k.rows < kVectorRowsMax) return row_ptrs_avx512(k, ids, n, base, stride, out);
  Lookup k0 = k;  // rows in the folded table: no offset
  k0.offset = 0;
  rows_of_run(k0, ids, n, scratch);
  for (int64_t m = 0; m < n; ++m) out[m] = base + scratch[m] * stride;
}

// Phase one of the candidates' first layer, per candidate i < R: the sum over q < nq of its
// folded rows row[q * R + i] (H floats, then sum(e) and sum(e^2) as two doubles) plus its
// nd dense columns x[i * ld + j] times their wg_t rows wx [nd, H] -> pr [R, H]; the folded
// rows' and dense columns' sum(x) and sum(x^2) -> rs, rss [R] (float64)
struct CandRows {
  const float* const* row;  // [nq, R]: each candidate's row in each lookup's folded table
  int64_t nq;
  const float* x;
  int64_t ld, nd;
  const float* wx;
};

template <int NV>
__attribute__((target("avx512f,avx2,fma"), always_inline)) inline void gather_rows_avx512(
    const CandRows& c, int64_t R, int64_t stride, int64_t i0, int64_t i1, float* pr, double* rs, double* rss) {
  const int64_t last = stride * 4 - 1, nq = c.nq, nd = c.nd;
  const float* const* row = c.row;
  pr -= i0 * 16 * NV, rs -= i0, rss -= i0;  // candidates i0..i1 of R -> pr, rs, rss from 0
  for (int64_t i = i0; i < i1; ++i) {
    if (i + kAhead < R)  // the first and last lines of the rows kAhead ahead (a prefetch per
                         // line cost more than it saved on ads_ctr's 144-byte rows)
      for (int64_t q = 0; q < nq; ++q) {
        const char* p4 = reinterpret_cast<const char*>(row[q * R + i + kAhead]);
        __builtin_prefetch(p4);
        __builtin_prefetch(p4 + last);
      }
    // two chains of adds (the folded rows, the dense columns), added at the end: one chain
    // of eight dependent adds per candidate left the gather waiting on their latency
    __m512 acc[NV], acd[NV];
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_setzero_ps(), acd[v] = _mm512_setzero_ps();
    __m128d st = _mm_setzero_pd(), sd = _mm_setzero_pd();
    int64_t q = 0;
    for (; q + 2 <= nq; q += 2) {
      const float* p = row[q * R + i];
      const float* p1 = row[(q + 1) * R + i];
      for (int v = 0; v < NV; ++v) {
        acc[v] = _mm512_add_ps(acc[v], _mm512_loadu_ps(p + 16 * v));
        acd[v] = _mm512_add_ps(acd[v], _mm512_loadu_ps(p1 + 16 * v));
      }
      st = _mm_add_pd(st, _mm_loadu_pd(reinterpret_cast<const double*>(p + 16 * NV)));
      sd = _mm_add_pd(sd, _mm_loadu_pd(reinterpret_cast<const double*>(p1 + 16 * NV)));
    }
    if (q < nq) {
      const float* p = row[q * R + i];
      for (int v = 0; v < NV; ++v) acc[v] = _mm512_add_ps(acc[v], _mm512_loadu_ps(p + 16 * v));
      st = _mm_add_pd(st, _mm_loadu_pd(reinterpret_cast<const double*>(p + 16 * NV)));
    }
    const float* xi = c.x + i * c.ld;
    for (int64_t j = 0; j < nd; ++j) {
      const __m512 xv = _mm512_set1_ps(xi[j]);
      for (int v = 0; v < NV; ++v) acd[v] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(c.wx + j * 16 * NV + 16 * v), acd[v]);
      const double xd = xi[j];
      sd = _mm_add_pd(sd, _mm_set_pd(xd * xd, xd));
    }
    st = _mm_add_pd(st, sd);
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(pr + i * 16 * NV + 16 * v, _mm512_add_ps(acc[v], acd[v]));
    rs[i] = _mm_cvtsd_f64(st);
    rss[i] = _mm_cvtsd_f64(_mm_unpackhi_pd(st, st));
  }
}

// The lean candidates' first layer on AVX-512, 32 candidates at a time: their gathered sums
// (gather_rows_avx512) in a block that stays in L1 (32 rows: the statistics' divides and
// square roots of 4 vectors of rows overlap; 8 rows left them waiting on their latency), the block's LayerNorm statistics
// (row_stats_avx512) and the affine step (mm_block512's epilogue with no columns) straight
// to h: one pass over the candidates where gather, statistics and epilogue took three.
template <int NV>
__attribute__((target("avx512f,avx512dq,avx2,fma"))) void lean_rows_avx512(const CandRows& c, int64_t R,
                                                                          int64_t stride, const FirstLayer& f,
                                                                          const float* pc, double cs, double css,
                                                                          float* h) {
  constexpr int64_t H = 16 * NV;
  constexpr int64_t kB = 32;
  alignas(64) float pr[kB * H];
  double s[kB], ss[kB];
  float mean[kB], rstd[kB];
  __m512 pcv[NV], wsv[NV], bv[NV];
  for (int v = 0; v < NV; ++v)
    pcv[v] = _mm512_loadu_ps(pc + 16 * v), wsv[v] = _mm512_loadu_ps(f.wg_sum + 16 * v),
    bv[v] = _mm512_loadu_ps(f.b_eff + 16 * v);
  for (int64_t r0 = 0; r0 < R; r0 += kB) {
    const int64_t nb = std::min<int64_t>(kB, R - r0);
    gather_rows_avx512<NV>(c, R, stride, r0, r0 + nb, pr, s, ss);
    for (int64_t i = 0; i < nb; ++i) s[i] = cs + s[i], ss[i] = css + ss[i];  // + the context's
    const bool over = row_stats_avx512(s, ss, nb, f.K, f.eps, mean, rstd);
    float* hb = h + r0 * H;
    for (int64_t i = 0; i < nb; ++i) {
      const __m512 m = _mm512_set1_ps(mean[i]), rs = _mm512_set1_ps(rstd[i]);
      for (int v = 0; v < NV; ++v) {
        __m512 t = _mm512_add_ps(pcv[v], _mm512_loadu_ps(pr + i * H + 16 * v));
        t = _mm512_fnmadd_ps(m, wsv[v], t);
        _mm512_storeu_ps(hb + i * H + 16 * v, _mm512_fmadd_ps(t, rs, bv[v]));
      }
      if (over && rstd[i] == 0.0f) std::copy(f.b_eff, f.b_eff + H, hb + i * H);  // as first_layer_rows
    }
  }
}

// false when lean_rows_avx512 does not apply (then gather_rows and first_layer_rows)
bool lean_rows(const CandRows& c, int64_t R, int64_t stride, const FirstLayer& f, const float* pc, double cs,
               double css, float* h) {
  if (!kHasAvx512 || f.H % 16 != 0 || f.H < 16 || f.H > 64) return false;
  switch (f.H / 16) {
    case 1: lean_rows_avx512<1>(c, R, stride, f, pc, cs, css, h); break;
    case 2: lean_rows_avx512<2>(c, R, stride, f, pc, cs, css, h); break;
    case 3: lean_rows_avx512<3>(c, R, stride, f, pc, cs, css, h); break;
    default: lean_rows_avx512<4>(c, R, stride, f, pc, cs, css, h);
  }
  return true;
}

// the portable gather (lean_rows takes every case AVX-512 can)
void gather_rows(const CandRows& c, int64_t R, int64_t H, float* pr, double* rs, double* rss) {
  std::fill(pr, pr + R * H, 0.0f);
  for (int64_t i = 0; i < R; ++i) {
    float* o = pr + i * H;
    double s = 0, ss = 0;
    for (int64_t q = 0; q < c.nq; ++q) add_folded_row(o, c.row[q * R + i], H, s, ss);
    for (int64_t j = 0; j < c.nd; ++j) {
      const float xv = c.x[i * c.ld + j];
      for (int64_t k = 0; k < H; ++k) o[k] += xv * c.wx[j * H + k];
      s += xv;
      ss += static_cast<double>(xv) * xv;
    }
    rs[i] = s;
    rss[i] = ss;
  }
}

// Whether score_candidates takes the lean path when a request qualifies: ROCKETREC_OPS_LEAN=0
// turns it off, rocketrec::lean_candidates(on) at run time (tests compare both paths).
std::atomic<int64_t>& lean_ref() {
  static std::atomic<int64_t> on{[] {
    const char* e = std::getenv("ROCKETREC_OPS_LEAN");
    return int64_t{e == nullptr || std::strcmp(e, "0") != 0};
  }()};
  return on;
}
bool lean_enabled() { return lean_ref().load(std::memory_order_relaxed) != 0; }
int64_t lean_candidates(int64_t on) { return on >= 0 ? lean_ref().exchange(on != 0) : lean_ref().load(); }
std::atomic<int64_t> lean_count{0};  // calls the lean path scored (rocketrec::lean_calls)
int64_t lean_calls() { return lean_count.load(); }

// values, lengths, dense: contiguous and checked (check_inputs: B rows); tables checked
bool candidates_lean(const Config& c, const FirstLayer& f, const FoldSet& fs, const at::Tensor& values,
                     const at::Tensor& lengths, const at::Tensor& dense, at::TensorList tables,
                     bool int8, int64_t B, float* hp) {
  const int64_t M = B - 1, H = f.H, K = c.K;
  const int64_t* v = values.data_ptr<int64_t>();
  const int64_t* l = lengths.data_ptr<int64_t>();
  const float* dp = dense.data_ptr<float>();
  thread_local std::vector<int64_t> first;  // where each id input's ids start in values
  first.assign(static_cast<size_t>(c.I) + 1, 0);
  for (int64_t i = 0; i < c.I; ++i) {
    uint64_t n = 0;
    if (kHasAvx512)
      lengths_scan_avx512(l + i * B, B, ~uint64_t{0}, n);
    else
      for (int64_t b = 0; b < B; ++b) n += static_cast<uint64_t>(l[i * B + b]);
    first[static_cast<size_t>(i) + 1] = first[static_cast<size_t>(i)] + static_cast<int64_t>(n);
  }
  auto given = [&](int64_t s) {  // source s (an id input, or bucket s - I) is the context's
    return s < c.I ? l[s * B] > 0 : !std::isnan(dp[c.D + (s - c.I)]);
  };
  auto source_of = [&](const Lookup& k) {  // a lookup's source, -1 for a cross
    const int64_t kind = c.out_kind[static_cast<size_t>(k.out)], idx = c.out_index[static_cast<size_t>(k.out)];
    return kind == 0 ? idx : kind == 2 ? c.I + idx : int64_t{-1};
  };
  thread_local std::vector<int64_t> cand;  // the candidates' lookups (all folded)
  cand.clear();
  for (int64_t l_ = 0; l_ < c.L; ++l_) {
    const int64_t s = source_of(c.lookups[static_cast<size_t>(l_)]);
    if (s >= 0 && given(s)) continue;
    if (!folds(fs, l_)) return false;
    cand.push_back(l_);
  }
  // each candidate's row per lookup in its folded table (an empty bag: the table's zero row)
  const int64_t nq = static_cast<int64_t>(cand.size());
  thread_local std::vector<const float*> crow;  // [nq, M]: each candidate's folded row per lookup
  thread_local std::vector<int64_t> rowi, keys, tmp, rows;
  thread_local std::vector<uint8_t> has, tmp_has;
  crow.resize(static_cast<size_t>(M * nq));
  rowi.resize(static_cast<size_t>(M));
  keys.resize(static_cast<size_t>(M));
  tmp.resize(static_cast<size_t>(M));
  rows.resize(static_cast<size_t>(M));
  has.resize(static_cast<size_t>(M));
  tmp_has.resize(static_cast<size_t>(M));
  // raw pointers: a thread_local's address is a call in a shared library, and the uint8_t
  // stores below may alias anything, so the loops would call it again every iteration
  int64_t* __restrict key = keys.data();
  int64_t* __restrict tid = tmp.data();
  uint8_t* __restrict hs = has.data();
  uint8_t* __restrict ths = tmp_has.data();
  int64_t* __restrict rq = rowi.data();
  const float** cp = crow.data();
  const int64_t stride = fs.stride;
  for (int64_t q = 0; q < nq; ++q) {
    const int64_t l_ = cand[static_cast<size_t>(q)];
    const Lookup& k = c.lookups[static_cast<size_t>(l_)];
    const int64_t kind = c.out_kind[static_cast<size_t>(k.out)], idx = c.out_index[static_cast<size_t>(k.out)];
    const int64_t* ids = key;  // each candidate's id (or key) for this lookup
    bool all = false;            // every candidate has one (hs not written)
    if (kind == 0) {
      ids = candidate_ids(v, l, B, idx, first[static_cast<size_t>(idx)], key, hs, &all);
      if (ids == nullptr) return false;
    } else if (kind == 2) {
      buckets(c, idx, dp, 1, M, key);
      all = true;  // every candidate has a bucket
    } else {  // a cross: FNV-1a over one id per source, then fmix64 (Work::cross)
      const int64_t s0 = c.cross_start[static_cast<size_t>(idx)], s1 = c.cross_start[static_cast<size_t>(idx + 1)];
      if (s1 <= s0) return false;
      std::fill(key, key + M, static_cast<int64_t>(kFnvOffset));
      std::memset(hs, 1, static_cast<size_t>(M));
      for (int64_t q2 = s0; q2 < s1; ++q2) {
        const int64_t src = c.cross_src[static_cast<size_t>(q2)];
        if (given(src)) {  // the context's id (or bucket) in every candidate's cross
          int64_t id;
          if (src < c.I) {
            if (l[src * B] != 1) return false;
            id = v[first[static_cast<size_t>(src)]];
          } else {
            buckets(c, src - c.I, dp, 0, 1, &id);
          }
          for (int64_t m = 0; m < M; ++m)
            key[m] = static_cast<int64_t>((static_cast<uint64_t>(key[m]) ^ static_cast<uint64_t>(id)) * kFnvPrime);
          continue;
        }
        const int64_t* sid = tid;
        if (src < c.I) {
          bool one = false;
          sid = candidate_ids(v, l, B, src, first[static_cast<size_t>(src)], tid, ths, &one);
          if (sid == nullptr) return false;
          if (!one)
            for (int64_t m = 0; m < M; ++m) hs[m] &= ths[m];
        } else {
          buckets(c, src - c.I, dp, 1, M, tid);
        }
        for (int64_t m = 0; m < M; ++m)
          key[m] = static_cast<int64_t>((static_cast<uint64_t>(key[m]) ^ static_cast<uint64_t>(sid[m])) * kFnvPrime);
      }
      for (int64_t m = 0; m < M; ++m) key[m] = static_cast<int64_t>(fmix64(static_cast<uint64_t>(key[m])));
    }
    const float* base = fs.data[static_cast<size_t>(fs.slot[static_cast<size_t>(l_)])].get();
    const float** cq = cp + q * M;
    row_ptrs(k, ids, M, base, stride, cq, rq);
    if (!all) {
      int64_t every = 1;
      for (int64_t m = 0; m < M; ++m) every &= hs[m];
      if (!every)
        for (int64_t m = 0; m < M; ++m)
          if (!hs[m]) cq[m] = base + k.rows * stride;  // the zero row
    }
  }
  // the context's share: its lookups pooled from row 0, its dense columns
  thread_local std::vector<float> ctx, pc;
  ctx.assign(static_cast<size_t>(K), 0.0f);
  for (int64_t l_ = 0; l_ < c.L; ++l_) {
    const Lookup& k = c.lookups[static_cast<size_t>(l_)];
    const int64_t s = source_of(k);
    if (s < 0 || !given(s)) continue;
    int64_t n = 1;
    if (s < c.I) {
      const int64_t cap = c.id_cap[static_cast<size_t>(s)];
      n = cap > 0 ? std::min(l[s * B], cap) : l[s * B];
      if (rows.size() < static_cast<size_t>(n)) rows.resize(static_cast<size_t>(n));
      rows_of_run(k, v + first[static_cast<size_t>(s)], n, rows.data());
    } else {
      int64_t bk;
      buckets(c, s - c.I, dp, 0, 1, &bk);
      rows_of_run(k, &bk, 1, rows.data());
    }
    const at::Tensor& t = tables[static_cast<size_t>(k.group)];
    pool_lookup(ctx.data() + k.col, K, k.dim, k.mean != 0, 1, &n, 0, rows.data(),
                static_cast<const uint8_t*>(t.data_ptr()), t.size(1) * (int8 ? 1 : 4), int8,
                c.group_dim[static_cast<size_t>(k.group)]);
  }
  const Work w(c, B, true);
  if (c.D > 0) w.dense_row(dp, 0, ctx.data() + (K - c.D));  // the candidates' columns come out 0
  pc.resize(static_cast<size_t>(H));
  rows_times(ctx.data(), K, 1, K, f.wg_t, H, pc.data());
  double cs = 0, css = 0;
  moments(ctx.data(), K, cs, css);
  // the candidates' dense columns (row 0 NaN) and their wg_t rows
  thread_local std::vector<float> xd, x, wx, pr;
  thread_local std::vector<double> rs, rss;
  thread_local std::vector<int64_t> dcols;
  dcols.clear();
  for (int64_t j = 0; j < c.D; ++j)
    if (std::isnan(dp[j])) dcols.push_back(j);
  const int64_t nd = static_cast<int64_t>(dcols.size());
  xd.resize(static_cast<size_t>(M * std::max<int64_t>(c.D, 1)));
  if (c.D > 0) w.dense_rows(dp, xd.data(), c.D, 1, M);
  const float* xp = xd.data();
  int64_t ld = c.D;
  if (nd < c.D) {
    x.resize(static_cast<size_t>(M * std::max<int64_t>(nd, 1)));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < nd; ++j) x[static_cast<size_t>(m * nd + j)] = xd[static_cast<size_t>(m * c.D + dcols[static_cast<size_t>(j)])];
    xp = x.data(), ld = nd;
  }
  wx.resize(static_cast<size_t>(std::max<int64_t>(nd, 1) * H));
  for (int64_t j = 0; j < nd; ++j)
    std::memcpy(wx.data() + j * H, f.wg_t + (K - c.D + dcols[static_cast<size_t>(j)]) * H,
                static_cast<size_t>(H) * sizeof(float));
  const CandRows cr{crow.data(), nq, xp, ld, nd, wx.data()};
  if (lean_rows(cr, M, fs.stride, f, pc.data(), cs, css, hp)) return true;
  pr.resize(static_cast<size_t>(M * H));
  rs.resize(static_cast<size_t>(M));
  rss.resize(static_cast<size_t>(M));
  gather_rows(cr, M, H, pr.data(), rs.data(), rss.data());
  // phase two: the statistics and the affine step (no columns left: all in pr, rs, rss)
  first_layer_rows(f, pr.data(), 0, M, 0, wx.data(), pc.data(), cs, css, hp, RowShare{pr.data(), rs.data(), rss.data()});
  return true;
}

// score_candidates' first layer (FirstLayer) for each merged row x = c + y (disjoint
// columns, so sum(x) and sum(x^2) split too): h [M, H] = rstd * (W(g*c) + W(g*y) - mean *
// W g) + (W beta + b). The context's product is one [1, K] x [K, H]; each candidate pays
// for its own Kc columns only.
at::Tensor light_first_layer_context(const at::Tensor& values, const at::Tensor& lengths,
                                     const at::Tensor& dense, const at::Tensor& icfg, const at::Tensor& fcfg,
                                     at::TensorList tables, bool int8, const at::Tensor& wg_t,
                                     const at::Tensor& wg_sum, const at::Tensor& b_eff, double eps) {
  const Config& c = cached_config(icfg, fcfg);
  const FirstLayer f(wg_t, wg_sum, b_eff, c.K, eps);  // checks wg_t's shape before fold_set reads it
  check_tables(c, tables, int8);  // and the tables'
  const FoldSet* fs = fold_set(c, icfg, tables, int8, wg_t, f.H);
  if (fs != nullptr && lean_enabled()) {
    const int64_t B = check_inputs(c, values, lengths, dense);
    TORCH_CHECK(B >= 2, "rocketrec: score_candidates needs the context row and >= 1 candidate");
    const Contiguous in(values, lengths, dense);
    const at::Tensor &vc = in.v(), &lc = in.l(), &dc = in.d();
    at::Tensor h = first_layer_out(1, B - 1, f.H);
    if (candidates_lean(c, f, *fs, vc, lc, dc, tables, int8, B, h.data_ptr<float>())) {
      lean_count.fetch_add(1, std::memory_order_relaxed);
      return h;
    }
  }
  Split sp = context_split(values, lengths, dense, icfg, fcfg, tables, int8, fs, false);
  const std::vector<int64_t>& cols = sp.cols;
  const int64_t K = sp.ctx.size(1), M = sp.M;
  const int64_t H = f.H, kc = sp.kc;
  thread_local std::vector<float> pc, wc;
  pc.resize(static_cast<size_t>(H));  // W(g*c): [1, H]
  const float* cp = sp.ctx.data_ptr<float>();
  rows_times(cp, K, 1, K, f.wg_t, H, pc.data());
  wc.resize(static_cast<size_t>(kc * H));  // wg_t's rows of the candidates' columns
  for (int64_t j = 0; j < kc; ++j)
    std::memcpy(wc.data() + j * H, f.wg_t + cols[static_cast<size_t>(j)] * H, static_cast<size_t>(H) * sizeof(float));
  at::Tensor h = first_layer_out(1, M, H);
  const float* yp = sp.cand_p;
  float* hp = h.data_ptr<float>();
  double cs = 0, css = 0;
  moments(cp, K, cs, css);
  RowShare share;
  if (!sp.folded.empty()) {  // the candidates' folded lookups (context_split left them out)
    WorkBuffers& wb = work_buffers();  // the rows context_split computed
    const Rows r{wb.base, wb.stride, wb.rows, wb.bag_end};
    share = folded_share(*fs, c, r, sp.folded, M + 1, 1, M + 1);
  }
  first_layer_rows(f, yp, kc, M, kc, wc.data(), pc.data(), cs, css, hp, share);
  return h;
}

at::Tensor light_first_layer_meta(const at::Tensor&, const at::Tensor&, const at::Tensor& dense,
                                  const at::Tensor&, const at::Tensor&, at::TensorList, bool,
                                  const at::Tensor& wg_t, const at::Tensor&, const at::Tensor&, double) {
  return at::empty_symint({dense.sym_size(0), wg_t.sym_size(1)}, dense.options().dtype(at::kFloat));
}

at::Tensor light_first_layer_context_meta(const at::Tensor&, const at::Tensor&, const at::Tensor& dense,
                                          const at::Tensor&, const at::Tensor&, at::TensorList, bool,
                                          const at::Tensor& wg_t, const at::Tensor&, const at::Tensor&, double) {
  // symbolic sizes: torch.export keeps the batch dynamic instead of specializing it
  return at::empty_symint({dense.sym_size(0) - 1, wg_t.sym_size(1)}, dense.options().dtype(at::kFloat));
}

// Shape-only kernel (torch.export / FakeTensor): x [B, out_dim].
at::Tensor light_features_meta(const at::Tensor&, const at::Tensor&, const at::Tensor& dense,
                               const at::Tensor&, const at::Tensor&, at::TensorList, bool,
                               int64_t out_dim) {
  return at::empty_symint({dense.sym_size(0), c10::SymInt(out_dim)}, dense.options().dtype(at::kFloat));
}

int64_t version() { return kOpsVersion; }

}  // namespace rocketrec_ops

TORCH_LIBRARY(rocketrec, m) {
  m.def(
      "light_features(Tensor values, Tensor lengths, Tensor dense, Tensor icfg, Tensor fcfg, "
      "Tensor[] tables, bool int8, int out_dim) -> Tensor");
  m.def(
      "light_features_context(Tensor values, Tensor lengths, Tensor dense, Tensor icfg, "
      "Tensor fcfg, Tensor[] tables, bool int8) -> (Tensor, Tensor, Tensor)");
  m.def(
      "light_first_layer(Tensor values, Tensor lengths, Tensor dense, Tensor icfg, "
      "Tensor fcfg, Tensor[] tables, bool int8, Tensor wg_t, Tensor wg_sum, Tensor b_eff, "
      "float eps) -> Tensor");
  m.def(
      "light_first_layer_context(Tensor values, Tensor lengths, Tensor dense, Tensor icfg, "
      "Tensor fcfg, Tensor[] tables, bool int8, Tensor wg_t, Tensor wg_sum, Tensor b_eff, "
      "float eps) -> Tensor");
  m.def(
      "preprocess(Tensor values, Tensor lengths, Tensor dense, Tensor icfg, Tensor fcfg, "
      "bool context) -> (Tensor, Tensor, Tensor)");
  m.def("version() -> int", &rocketrec_ops::version);
  m.def("fold_budget_mb(int mb) -> int", &rocketrec_ops::fold_budget_mb);
  m.def("fold_stats() -> int[]", &rocketrec_ops::fold_stats);
  m.def("fold_clear() -> int", &rocketrec_ops::fold_clear);
  m.def("lean_candidates(int on) -> int", &rocketrec_ops::lean_candidates);
  m.def("lean_calls() -> int", &rocketrec_ops::lean_calls);
}

TORCH_LIBRARY_IMPL(rocketrec, CPU, m) {
  m.impl("light_features", &rocketrec_ops::light_features);
  m.impl("light_features_context", &rocketrec_ops::light_features_context);
  m.impl("light_first_layer", &rocketrec_ops::light_first_layer);
  m.impl("light_first_layer_context", &rocketrec_ops::light_first_layer_context);
  m.impl("preprocess", &rocketrec_ops::preprocess);
}

TORCH_LIBRARY_IMPL(rocketrec, Meta, m) {
  m.impl("light_features", &rocketrec_ops::light_features_meta);
  m.impl("light_first_layer", &rocketrec_ops::light_first_layer_meta);
  m.impl("light_first_layer_context", &rocketrec_ops::light_first_layer_context_meta);
}

// -- C shims: what an AOTInductor package calls ---------------------------------------------
//
// `rocketrec export --format aoti` names these functions in the package
// (aot_inductor.custom_ops_to_c_shims, rocketrec/serving/aoti.py): the compiled model calls
// the operators straight through them, where the proxy executor boxed every argument and
// went through the dispatcher (about 0.9 us a call here, a quarter of the light tower at
// batch 1). The package's shared object finds them when this library is loaded with
// RTLD_GLOBAL or linked (the Predictor and rocketrec.serving.ops do so). An error is kept
// per thread for rocketrec_ops_last_error(): the package itself reports only that a call failed.
namespace {
thread_local std::string shim_error;

template <class F>
AOTITorchError shim_call(F&& f) {
  try {
    f();
    if (!shim_error.empty()) shim_error.clear();  // a later failure elsewhere is not this one
    return AOTI_TORCH_SUCCESS;
  } catch (const c10::Error& e) {
    shim_error = e.what_without_backtrace();
  } catch (const std::exception& e) {
    shim_error = e.what();
  }
  return AOTI_TORCH_FAILURE;
}

const at::Tensor& tensor_of(AtenTensorHandle h) { return *reinterpret_cast<at::Tensor*>(h); }

std::vector<at::Tensor> tensors_of(const AtenTensorHandle* h, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out.push_back(tensor_of(h[i]));
  return out;
}

AtenTensorHandle handle_of(at::Tensor&& t) { return reinterpret_cast<AtenTensorHandle>(new at::Tensor(std::move(t))); }
}  // namespace

extern "C" {
__attribute__((visibility("default"))) AOTITorchError aoti_torch_cpu_light_features(
    AtenTensorHandle values, AtenTensorHandle lengths, AtenTensorHandle dense, AtenTensorHandle icfg,
    AtenTensorHandle fcfg, const AtenTensorHandle* tables, int64_t tables_len_, int32_t int8, int64_t out_dim,
    AtenTensorHandle* ret0) {
  return shim_call([&] {
    *ret0 = handle_of(rocketrec_ops::light_features(tensor_of(values), tensor_of(lengths), tensor_of(dense),
                                                    tensor_of(icfg), tensor_of(fcfg), tensors_of(tables, tables_len_),
                                                    int8 != 0, out_dim));
  });
}

// forward's and score_candidates' first layer: the same arguments
#define ROCKETREC_FIRST_LAYER_SHIM(NAME, FN)                                                                       \
  __attribute__((visibility("default"))) AOTITorchError NAME(                                                      \
      AtenTensorHandle values, AtenTensorHandle lengths, AtenTensorHandle dense, AtenTensorHandle icfg,            \
      AtenTensorHandle fcfg, const AtenTensorHandle* tables, int64_t tables_len_, int32_t int8,                    \
      AtenTensorHandle wg_t, AtenTensorHandle wg_sum, AtenTensorHandle b_eff, double eps, AtenTensorHandle* ret0) { \
    return shim_call([&] {                                                                                         \
      *ret0 = handle_of(rocketrec_ops::FN(tensor_of(values), tensor_of(lengths), tensor_of(dense),                \
                                          tensor_of(icfg), tensor_of(fcfg), tensors_of(tables, tables_len_),       \
                                          int8 != 0, tensor_of(wg_t), tensor_of(wg_sum), tensor_of(b_eff), eps));  \
    });                                                                                                            \
  }

ROCKETREC_FIRST_LAYER_SHIM(aoti_torch_cpu_light_first_layer, light_first_layer)
ROCKETREC_FIRST_LAYER_SHIM(aoti_torch_cpu_light_first_layer_context, light_first_layer_context)
#undef ROCKETREC_FIRST_LAYER_SHIM

// The message of this thread's last failed shim call ("" if none failed yet).
__attribute__((visibility("default"))) const char* rocketrec_ops_last_error() { return shim_error.c_str(); }
}
