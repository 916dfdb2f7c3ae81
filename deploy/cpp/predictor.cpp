#include "predictor.h"

#include <cmath>
#include <limits>

#include "rocketrec_hash.h"

namespace rocketrec {

Predictor::Predictor(const std::string& path) {
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
  Json m;
  try {
    m = parse_json(manifest_text_);
  } catch (const JsonError& e) {
    throw std::runtime_error(path + ": manifest.json: " + e.what());
  }
  const Json* fmt = m.get("format");
  if (!fmt || fmt->type != Json::Type::String || fmt->s.rfind("rocketrec-light/", 0) != 0)
    throw std::runtime_error(path + ": manifest format is not rocketrec-light/*");
  const Json* sf = m.get("sparse_features");
  const Json* df = m.get("dense_features");
  if (!sf || sf->type != Json::Type::Array || !df || df->type != Json::Type::Array)
    throw std::runtime_error(path + ": manifest lacks sparse_features/dense_features");
  for (const auto& f : sf->arr) {
    const Json* name = f.get("name");
    const Json* dtype = f.get("dtype");
    if (!name || !dtype) throw std::runtime_error(path + ": manifest feature without name/dtype");
    sparse_.push_back({name->s, dtype->s == "string"});
  }
  for (const auto& f : df->arr) {
    const Json* name = f.get("name");
    if (!name) throw std::runtime_error(path + ": manifest dense feature without name");
    dense_.push_back({name->s});
  }
  // The hash must be the one this program implements: check the manifest's vectors.
  const Json* hash = m.get("hash");
  const Json* vectors = hash ? hash->get("test_vectors") : nullptr;
  if (!vectors) throw std::runtime_error(path + ": manifest lacks hash test vectors");
  for (const auto& tv : vectors->arr) {
    if (tv.arr.size() != 2 || fnv1a64(tv.arr[0].s) != tv.arr[1].i)
      throw std::runtime_error(path + ": manifest hash test vector mismatch for '" + tv.arr[0].s + "'");
  }
}

static void add_ids(const SparseFeatureInfo& f, const Json& v, std::vector<int64_t>& bag) {
  auto one = [&](const Json& x) {
    if (f.is_string) {
      if (x.type != Json::Type::String)
        throw RequestError("feature '" + f.name + "' expects string ids, got " + x.type_name());
      bag.push_back(fnv1a64(x.s));
    } else {
      if (x.type != Json::Type::Int)
        throw RequestError("feature '" + f.name + "' expects int64 ids, got " + x.type_name());
      bag.push_back(x.i);
    }
  };
  if (v.type == Json::Type::Null) return;
  if (v.type == Json::Type::Array) {
    for (const auto& x : v.arr) one(x);
  } else {
    one(v);
  }
}

static float dense_value(const std::string& name, const Json& v) {
  if (v.type == Json::Type::Null) return std::numeric_limits<float>::quiet_NaN();  // missing
  if (!v.is_number()) throw RequestError("dense feature '" + name + "' expects a number, got " + v.type_name());
  return static_cast<float>(v.number());
}

Request Predictor::parse_request(const std::string& line) const {
  Json obj;
  try {
    obj = parse_json(line);
  } catch (const JsonError& e) {
    throw RequestError(e.what());
  }
  if (obj.type != Json::Type::Object) throw RequestError("a request must be a JSON object");
  Request r;
  r.bags.resize(sparse_.size());
  r.dense.assign(dense_.size(), std::numeric_limits<float>::quiet_NaN());
  const Json* named = &obj;
  const Json* sp = obj.get("sparse");
  const Json* dv = obj.get("dense");
  if (sp || (dv && dv->type == Json::Type::Array)) {
    for (const auto& kv : obj.obj)
      if (kv.first != "sparse" && kv.first != "dense")
        throw RequestError("unexpected key '" + kv.first + "' beside 'sparse'/'dense'");
    if (dv) {
      if (dv->type != Json::Type::Array || dv->arr.size() != dense_.size())
        throw RequestError("'dense' must be a list of " + std::to_string(dense_.size()) + " numbers, got " +
                           (dv->type == Json::Type::Array ? std::to_string(dv->arr.size()) : dv->type_name()));
      for (size_t i = 0; i < dense_.size(); ++i) r.dense[i] = dense_value(dense_[i].name, dv->arr[i]);
    }
    static const Json empty_object = [] { Json j; j.type = Json::Type::Object; return j; }();
    named = sp ? sp : &empty_object;
    if (named->type != Json::Type::Object) throw RequestError("'sparse' must be an object");
  }
  for (const auto& kv : named->obj) {
    bool found = false;
    for (size_t i = 0; i < sparse_.size() && !found; ++i)
      if (sparse_[i].name == kv.first) { add_ids(sparse_[i], kv.second, r.bags[i]); found = true; }
    for (size_t i = 0; i < dense_.size() && !found; ++i)
      if (dense_[i].name == kv.first) { r.dense[i] = dense_value(kv.first, kv.second); found = true; }
    if (!found) throw RequestError("unknown feature '" + kv.first + "'");
  }
  return r;
}

std::vector<torch::jit::IValue> Predictor::inputs(const std::vector<Request>& batch) const {
  const int64_t B = static_cast<int64_t>(batch.size());
  const int64_t F = static_cast<int64_t>(sparse_.size());
  const int64_t D = static_cast<int64_t>(dense_.size());
  int64_t n = 0;
  for (const auto& r : batch)
    for (const auto& bag : r.bags) n += static_cast<int64_t>(bag.size());
  auto values = torch::empty({n}, torch::kInt64);
  auto lengths = torch::empty({F * B}, torch::kInt64);
  auto dense = torch::empty({B, D}, torch::kFloat32);
  int64_t* v = values.data_ptr<int64_t>();
  int64_t* l = lengths.data_ptr<int64_t>();
  float* d = dense.data_ptr<float>();
  for (int64_t f = 0; f < F; ++f)  // feature-major, like a KeyedJaggedTensor
    for (int64_t b = 0; b < B; ++b) {
      const auto& bag = batch[b].bags[f];
      *l++ = static_cast<int64_t>(bag.size());
      for (int64_t id : bag) *v++ = id;
    }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < D; ++j) d[b * D + j] = batch[b].dense[j];
  return {values, lengths, dense};
}

std::vector<float> Predictor::predict(const std::vector<Request>& batch) {
  torch::NoGradGuard no_grad;
  at::Tensor out = module_.forward(inputs(batch)).toTensor().contiguous();
  return std::vector<float>(out.data_ptr<float>(), out.data_ptr<float>() + out.numel());
}

}  // namespace rocketrec
