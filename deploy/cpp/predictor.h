// rocketrec light-model predictor: load an exported TorchScript file, read and
// check its manifest, turn JSON requests into (values, lengths, dense) and score.
#pragma once
#include <torch/script.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.h"

namespace rocketrec {

struct RequestError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct SparseFeatureInfo {
  std::string name;
  bool is_string = false;  // string ids are hashed with fnv1a64
};

struct DenseFeatureInfo {
  std::string name;
};

// One parsed request: a bag of raw int64 ids per sparse feature, raw dense values
// (NaN = missing; the model fills and transforms them).
struct Request {
  std::vector<std::vector<int64_t>> bags;
  std::vector<float> dense;
};

class Predictor {
 public:
  // Throws std::runtime_error with a clear message if the file cannot be loaded or
  // its manifest is missing or not a rocketrec light model.
  explicit Predictor(const std::string& path);

  const std::vector<SparseFeatureInfo>& sparse() const { return sparse_; }
  const std::vector<DenseFeatureInfo>& dense() const { return dense_; }
  const std::string& manifest_text() const { return manifest_text_; }

  // Parse one JSON-lines request (named or {"sparse": {...}, "dense": [...]} form).
  Request parse_request(const std::string& line) const;

  // Score a batch: returns one click probability per request.
  std::vector<float> predict(const std::vector<Request>& batch);

  // Build the model inputs for a batch (feature-major lengths).
  std::vector<torch::jit::IValue> inputs(const std::vector<Request>& batch) const;

 private:
  torch::jit::script::Module module_;
  std::string manifest_text_;
  std::vector<SparseFeatureInfo> sparse_;
  std::vector<DenseFeatureInfo> dense_;
};

}  // namespace rocketrec
