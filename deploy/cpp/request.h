// rocketrec request parsing: JSON lines -> raw model inputs. No libtorch needed (the
// fuzz harness builds it alone with sanitizers). JSON is parsed by nlohmann-json.
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace rocketrec {

// A bad request: the message says what is wrong (feature, position); never a crash.
struct RequestError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct SparseFeatureInfo {
  std::string name;
  bool is_string = false;  // string ids are hashed with fnv1a64
  bool is_list = false;    // kind list (multi-hot) or sequence
  int64_t max_ids = 0;     // 0 = no cap (the model truncates; informational here)
};

struct DenseFeatureInfo {
  std::string name;
};

// One row: a bag of raw int64 ids per sparse input (manifest `sparse_features` order)
// and raw numbers per dense input (`dense_features` order; NaN = missing).
struct Request {
  std::vector<std::vector<int64_t>> bags;
  std::vector<float> dense;
};

// Rows as columns, in the model's own layout (a KeyedJaggedTensor's): for `rows` rows and
// the model's F sparse inputs (Predictor::sparse(), in order), lengths[f * rows + r] is
// the number of ids input f has in row r; ids holds input 0's ids of rows 0, 1, ...,
// then input 1's, and so on (string inputs: their fnv1a64 hashes, rocketrec_hash.h);
// dense is [rows x D] row by row, NaN where a value is missing. A server that holds its
// candidates' features as arrays scores them without one Request (and its heap vectors)
// per row: Predictor::predict(Columns) and score(context, Columns). Every input has its
// lengths and dense slots: an input the context gives has length 0 (dense: NaN) in every
// candidate row. A parsed Request's bags hold string ids already hashed: copy them as they are.
struct Columns {
  int64_t rows = 0;
  std::vector<int64_t> lengths;  // [F * rows]
  std::vector<int64_t> ids;      // sum(lengths)
  std::vector<float> dense;      // [rows * D]
};

// One context row against N candidate rows. Every input is given by the context or
// by the candidates, never by both (checked by the parser and by Predictor::score).
struct CandidatesRequest {
  Request context;
  std::vector<Request> candidates;
};

// One parsed line: a row, or a context with candidates.
struct ParsedLine {
  bool has_candidates = false;
  Request row;                   // when !has_candidates
  CandidatesRequest candidates;  // when has_candidates
};

struct Limits {
  size_t max_line_bytes = size_t{1} << 20;  // 1 MiB
  int max_depth = 32;                       // nesting of [ and {
  size_t max_candidates = 100000;
  size_t max_ids_per_bag = 100000;
};

// The manifest formats this predictor reads (rocketrec.serving.manifest.FORMATS_READ).
inline constexpr const char* kManifestFormatsRead = "rocketrec-light/1, rocketrec-light/2";
inline bool manifest_format_readable(const std::string& f) {
  return f == "rocketrec-light/1" || f == "rocketrec-light/2";
}

class RequestParser {
 public:
  RequestParser() = default;
  RequestParser(std::vector<SparseFeatureInfo> sparse, std::vector<DenseFeatureInfo> dense,
                Limits limits = {});
  // From the manifest's JSON text; throws std::runtime_error if it is not a rocketrec
  // manifest or its hash test vectors do not match this program's hashes.
  static RequestParser from_manifest(const std::string& manifest_text, Limits limits = {});

  // Any form (named, {"sparse", "dense"}, {"context", "candidates"}). Throws RequestError.
  ParsedLine parse(const std::string& line) const;
  // The one-row forms only.
  Request parse_request(const std::string& line) const;

  const std::vector<SparseFeatureInfo>& sparse() const { return sparse_; }
  const std::vector<DenseFeatureInfo>& dense() const { return dense_; }
  const Limits& limits() const { return limits_; }
  // Throws RequestError unless the request has one bag per sparse input and one value
  // per dense input (what the model needs: never a read out of bounds).
  void check_shape(const Request& r, const std::string& what) const;
  // Throws RequestError if an input is given by the context and by a candidate
  // (the requests must have the right shape: check_shape first).
  void check_disjoint(const Request& context, const std::vector<Request>& candidates) const;

 private:
  ParsedLine parse_unchecked(const std::string& line) const;
  std::vector<SparseFeatureInfo> sparse_;
  std::vector<DenseFeatureInfo> dense_;
  std::unordered_map<std::string, long> index_;  // name -> sparse i (>= 0) or -(dense i) - 1
  Limits limits_;
};

}  // namespace rocketrec
