#include "predictor.h"

#include <algorithm>
#include <cmath>

namespace rocketrec {

Predictor::Predictor(const std::string& path, Limits limits) {
  torch::jit::ExtraFilesMap extra{{"manifest.json", ""}};
  try {
    module_ = torch::jit::load(path, c10::nullopt, extra);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    throw std::runtime_error(path + ": cannot load TorchScript model: " + msg.substr(0, msg.find('\n')));
  }
  module_.eval();
  manifest_text_ = extra["manifest.json"];
  if (manifest_text_.empty()) throw std::runtime_error(path + ": no manifest.json inside: not a rocketrec export");
  try {
    parser_ = RequestParser::from_manifest(manifest_text_, limits);
  } catch (const std::exception& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
  has_candidates_ = module_.find_method("score_candidates").has_value();
}

std::vector<torch::jit::IValue> Predictor::inputs(const std::vector<Request>& batch) const {
  return build_inputs(nullptr, batch);
}

// Rows [first (if any), batch...] -> values [N], lengths [I*B] (input-major), dense [B, C].
std::vector<torch::jit::IValue> Predictor::build_inputs(const Request* first,
                                                        const std::vector<Request>& batch) const {
  const int64_t extra = first ? 1 : 0;
  const int64_t B = static_cast<int64_t>(batch.size()) + extra;
  const int64_t F = static_cast<int64_t>(sparse().size());
  const int64_t D = static_cast<int64_t>(dense().size());
  auto row = [&](int64_t b) -> const Request& { return b < extra ? *first : batch[static_cast<size_t>(b - extra)]; };
  int64_t n = 0;
  for (int64_t b = 0; b < B; ++b) {
    parser_.check_shape(row(b), b < extra ? std::string("the context")
                                          : (extra ? "candidate " : "request ") + std::to_string(b - extra));
    for (const auto& bag : row(b).bags) n += static_cast<int64_t>(bag.size());
  }
  auto values = torch::empty({n}, torch::kInt64);
  auto lengths = torch::empty({F * B}, torch::kInt64);
  auto dense_t = torch::empty({B, D}, torch::kFloat32);
  int64_t* v = values.data_ptr<int64_t>();
  int64_t* l = lengths.data_ptr<int64_t>();
  float* d = dense_t.data_ptr<float>();
  for (int64_t f = 0; f < F; ++f)  // input-major, like a KeyedJaggedTensor
    for (int64_t b = 0; b < B; ++b) {
      const auto& bag = row(b).bags[static_cast<size_t>(f)];
      *l++ = static_cast<int64_t>(bag.size());
      v = std::copy(bag.begin(), bag.end(), v);
    }
  for (int64_t b = 0; b < B; ++b) {
    const auto& r = row(b);
    std::copy(r.dense.begin(), r.dense.end(), d + b * D);
  }
  return {values, lengths, dense_t};
}

static std::vector<float> to_vector(const at::Tensor& t) {
  at::Tensor out = t.contiguous();
  return std::vector<float>(out.data_ptr<float>(), out.data_ptr<float>() + out.numel());
}

std::vector<float> Predictor::predict(const std::vector<Request>& batch) const {
  if (batch.empty()) return {};
  auto in = inputs(batch);
  c10::InferenceMode guard;
  // Module::forward is not const in the API, but running a method only reads the module
  auto& m = const_cast<torch::jit::script::Module&>(module_);
  return to_vector(m.forward(std::move(in)).toTensor());
}

std::vector<float> Predictor::score(const Request& context, const std::vector<Request>& candidates) const {
  if (candidates.empty()) return {};
  if (!has_candidates_)
    throw RequestError("this model file has no score_candidates entry point (exported by an older rocketrec)");
  auto in = build_inputs(&context, candidates);  // row 0 = the context; checks every shape
  parser_.check_disjoint(context, candidates);
  c10::InferenceMode guard;
  auto& m = const_cast<torch::jit::script::Module&>(module_);
  return to_vector(m.get_method("score_candidates")(std::move(in)).toTensor());
}

}  // namespace rocketrec
